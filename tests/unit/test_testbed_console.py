"""The test beds stream a guest's console file as it grows (testbed.vm.follow_file)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

from testbed.vm import follow_file


def test_console_is_followed_as_it_grows_until_stopped(tmp_path: Path) -> None:
    console = tmp_path / "console.log"          # QEMU creates it a little later
    out = io.StringIO()
    stop = threading.Event()
    t = threading.Thread(target=follow_file, args=(console, out, stop, 0.01), daemon=True)
    t.start()
    time.sleep(0.05)
    console.write_bytes(b"Linux version\r\n")
    with console.open("ab") as f:
        f.write(b"login: ")
    deadline = time.monotonic() + 10
    while "login: " not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    with console.open("ab") as f:
        f.write(b"\xffroot\r\n")
    stop.set()
    t.join(10)
    assert not t.is_alive()
    # What came before the stop is all there, once, with LF line ends.
    assert out.getvalue() == "Linux version\nlogin: \ufffdroot\n"
