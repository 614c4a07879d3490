"""kmodd.conf and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodd.daemon import settings as settings_mod
from kmodd.daemon.limits import MAX_KMOD_CONCURRENT
from kmodd.daemon.settings import Settings, SettingsError, parse_settings


def write(tmp: Path, text: str) -> str:
    path = tmp / "kmodd.conf"
    path.write_text(text)
    return str(path)


def test_defaults_follow_the_root(tmp_path: Path) -> None:
    s, _ = parse_settings(["--root", str(tmp_path)])
    assert 1 <= s.max_workers <= MAX_KMOD_CONCURRENT
    assert s.autoclean_interval == 60 and s.idle_timeout == 60
    assert s.never_unload == () and s.coldplug is True and s.kernel == "real"
    assert (s.runaway_limit, s.runaway_window) == (100, 10.0)
    assert s.socket == str(tmp_path / "run/kmodd/control")
    assert s.state_file == str(tmp_path / "run/kmodd/state.json")
    assert s.config_file == str(tmp_path / "etc/kmodd.conf")


def test_real_defaults_without_root() -> None:
    s = Settings()
    assert s.socket == "/run/kmodd/control" and s.state_file == "/run/kmodd/state.json"


def test_file_values_and_flags_win(tmp_path: Path) -> None:
    conf = write(tmp_path, 'max_workers = 3\nautoclean_interval = 0\nidle_timeout = 300\n'
                           'never_unload = ["snd-hda-intel", "e1000"]\nsocket = "/tmp/s"\n')
    s, _ = parse_settings(["--config", conf])
    assert (s.max_workers, s.autoclean_interval, s.idle_timeout) == (3, 0.0, 300.0)
    assert s.never_unload == ("snd_hda_intel", "e1000")
    assert s.socket == "/tmp/s"
    s, _ = parse_settings(["--config", conf, "--max-workers", "7", "--idle-timeout", "5",
                           "--never-unload", "a,b-c", "--never-unload", "d",
                           "--socket", "/x/ctl", "--no-coldplug", "--kernel", "sim:/t",
                           "-S", "6.1.0", "-C", "/etc/m.conf"])
    assert (s.max_workers, s.idle_timeout, s.socket) == (7, 5.0, "/x/ctl")
    assert s.never_unload == ("a", "b_c", "d")
    assert s.coldplug is False and s.kernel == "sim:/t" and s.version == "6.1.0"
    assert s.modprobe_config == ("/etc/m.conf",)


def test_kmodd_table_is_accepted(tmp_path: Path) -> None:
    s, _ = parse_settings(["--config", write(tmp_path, "[kmodd]\nidle_timeout = 9\n")])
    assert s.idle_timeout == 9


@pytest.mark.parametrize(("text", "message"), [
    ("max_wrokers = 3\n", "unknown setting 'max_wrokers'"),
    ('max_workers = "four"\n', "max_workers must be an integer"),
    ("max_workers = true\n", "max_workers must be an integer"),
    ("max_workers = 51\n", "between 1 and 50"),
    ("max_workers = 0\n", "between 1 and 50"),
    ('idle_timeout = "soon"\n', "idle_timeout must be a number"),
    ("autoclean_interval = -1\n", "must not be negative"),
    ("never_unload = [1, 2]\n", "never_unload must be a list of strings"),
    ('coldplug = "yes"\n', "coldplug must be true or false"),
    ('log_level = "loud"\n', "log_level must be one of"),
    ("this is = not toml [", "not valid TOML"),
])
def test_bad_file_gives_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    conf = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        parse_settings(["--config", conf])
    assert message in str(info.value) and conf in str(info.value)


def test_explicit_config_must_exist_default_may_not(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no such configuration file"):
        parse_settings(["--config", str(tmp_path / "missing.conf")])
    parse_settings(["--root", str(tmp_path)])       # no etc/kmodd.conf: defaults


def test_bad_flags(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="between 1 and 50"):
        parse_settings(["--root", str(tmp_path), "--max-workers", "99"])
    with pytest.raises(SettingsError, match="sim:PATH"):
        parse_settings(["--root", str(tmp_path), "--kernel", "fake"])
    with pytest.raises(SystemExit):
        parse_settings(["--max-workers", "many"])


def test_reload_rereads_the_file_and_keeps_flags(tmp_path: Path) -> None:
    conf = write(tmp_path, "idle_timeout = 10\nmax_workers = 2\n")
    s, source = parse_settings(["--config", conf, "--max-workers", "5"])
    assert (s.idle_timeout, s.max_workers) == (10, 5)
    write(tmp_path, "idle_timeout = 20\nmax_workers = 3\n")
    s2 = source.load()
    assert (s2.idle_timeout, s2.max_workers) == (20, 5)


def test_every_file_setting_is_also_a_flag(tmp_path: Path) -> None:
    s, _ = parse_settings(["--root", str(tmp_path), "--backoff-initial", "1",
                           "--backoff-max", "9", "--runaway-limit", "7",
                           "--runaway-window", "3", "--queue-limit", "99",
                           "--state-file", "/x/s.json", "--request-fifo", "/x/req",
                           "--log-level", "debug", "--journal"])
    assert (s.backoff_initial, s.backoff_max, s.runaway_limit, s.runaway_window,
            s.queue_limit) == (1, 9, 7, 3, 99)
    assert (s.state_file, s.request_fifo, s.log_level, s.journal) == \
        ("/x/s.json", "/x/req", "debug", True)
    with pytest.raises(SettingsError, match="runaway_limit must be at least 1"):
        parse_settings(["--root", str(tmp_path), "--runaway-limit", "0"])


# -- drop-ins and --show-config -------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_dropins_merge_in_systemd_order(tmp_path: Path) -> None:
    from kmodd.daemon.settings import merge_with_sources

    root = tmp_path
    _write(root / "etc/kmodd.conf", "idle_timeout = 10\nqueue_limit = 5\nmax_workers = 3\n")
    _write(root / "usr/lib/kmodd/kmodd.conf.d/10-vendor.conf", "idle_timeout = 20\n"
           "backoff_max = 99\n")
    # The same name in /etc hides /usr/lib's (its backoff_max never applies).
    _write(root / "usr/lib/kmodd/kmodd.conf.d/50-site.conf", "backoff_max = 1\n")
    _write(root / "etc/kmodd.conf.d/50-site.conf", "log_level = \"debug\"\n")
    # Later names override earlier ones, whatever their directory.
    _write(root / "run/kmodd/kmodd.conf.d/90-late.conf", "idle_timeout = 30\n")
    _write(root / "etc/kmodd.conf.d/README", "not a .conf file: ignored\n")
    settings, sources = merge_with_sources({"root": str(root), "max_workers": 2})
    assert settings.idle_timeout == 30
    assert sources["idle_timeout"] == str(root / "run/kmodd/kmodd.conf.d/90-late.conf")
    assert settings.backoff_max == 99
    assert sources["backoff_max"] == str(root / "usr/lib/kmodd/kmodd.conf.d/10-vendor.conf")
    assert settings.log_level == "debug"
    assert settings.queue_limit == 5 and sources["queue_limit"] == str(root / "etc/kmodd.conf")
    assert settings.max_workers == 2 and sources["max_workers"] == "command line"
    assert sources["coldplug"] == "default"


def test_dropin_masked_by_an_empty_file(tmp_path: Path) -> None:
    from kmodd.daemon.settings import merge

    _write(tmp_path / "usr/lib/kmodd/kmodd.conf.d/10-vendor.conf", "idle_timeout = 20\n")
    (tmp_path / "etc/kmodd.conf.d").mkdir(parents=True)
    (tmp_path / "etc/kmodd.conf.d/10-vendor.conf").symlink_to("/dev/null")
    assert merge({"root": str(tmp_path)}).idle_timeout == 60.0


def test_bad_dropin_names_its_file(tmp_path: Path) -> None:
    from kmodd.daemon.settings import SettingsError, merge

    _write(tmp_path / "etc/kmodd.conf.d/20-x.conf", "idle_timeot = 1\n")
    with pytest.raises(SettingsError, match=r"20-x\.conf: unknown setting 'idle_timeot'"):
        merge({"root": str(tmp_path)})


def test_explicit_config_reads_no_dropins(tmp_path: Path) -> None:
    from kmodd.daemon.settings import merge

    _write(tmp_path / "etc/kmodd.conf.d/20-x.conf", "idle_timeout = 1\n")
    _write(tmp_path / "mine.conf", "queue_limit = 7\n")
    s = merge({"root": str(tmp_path), "config_file": str(tmp_path / "mine.conf")})
    assert s.queue_limit == 7 and s.idle_timeout == 60.0


def test_show_config_prints_values_and_origins(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kmodd.cli.daemon import main

    _write(tmp_path / "etc/kmodd.conf.d/20-x.conf", "never_unload = [\"snd-hda-intel\"]\n")
    assert main(["--root", str(tmp_path), "--show-config", "--idle-timeout", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f'never_unload = ["snd_hda_intel"]  # {tmp_path}/etc/kmodd.conf.d/20-x.conf' in lines
    assert "idle_timeout = 5.0  # command line" in lines
    assert "coldplug = true  # default" in lines
    assert "# journal is unset  # default" in lines


def test_uevent_reader_from_file_and_flag(tmp_path: Path) -> None:
    assert parse_settings(["--root", str(tmp_path)])[0].uevent_reader == "netlink"
    conf = write(tmp_path, 'uevent_reader = "pyudev"\n')
    assert parse_settings(["--config", conf])[0].uevent_reader == "pyudev"
    s, _ = parse_settings(["--config", conf, "--uevent-reader", "netlink"])
    assert s.uevent_reader == "netlink"
    with pytest.raises(SettingsError, match="uevent_reader must be one of netlink, pyudev"):
        parse_settings(["--config", write(tmp_path, 'uevent_reader = "libudev"\n')])


@pytest.mark.parametrize("argv", [
    [], ["--no-journal"], ["--journal", "--journal"], ["--show-config"],
    ["--kernel", "sim:/tmp/x", "--root", "/tmp/x", "-d", "/", "-S", "9.9.9-test",
     "--no-journal", "--autoclean-interval", "0"],
    ["--config", "/etc/k.conf", "--max-workers", "4", "--idle-timeout", "2.5",
     "--never-unload", "a,b", "--never-unload", "c-d", "--deny", "x", "-C", "/e/m.d",
     "--modprobe-config", "/e/n.conf", "--no-coldplug", "--no-modules-load", "--no-head-start",
     "--log-level", "debug", "--uevent-reader", "pyudev", "--queue-limit", "9",
     "--runaway-limit", "3", "--runaway-window", "1e1", "--backoff-initial", "0",
     "--backoff-max", "nan", "--socket", "/s", "--state-file", "/st", "--request-fifo", "/f",
     "--dirname", "/b", "--set-version", "v", "--max-workers", "5"],
    ["--root", ""],
])
def test_fast_parse_agrees_with_argparse(argv: list[str]) -> None:
    fast = settings_mod.parse_fast(argv)
    assert fast is not None
    slow = settings_mod.build_parser().parse_args(argv)
    # By their text: NaN is never equal to itself.
    assert {k: repr(v) for k, v in vars(fast).items()} == \
        {k: repr(v) for k, v in vars(slow).items()}


@pytest.mark.parametrize("argv", [
    ["--help"], ["-h"], ["--version"], ["--max-workers"], ["--max-workers", "many"],
    ["--max-workers=4"], ["--max-work", "4"], ["--log-level", "loud"],
    ["--uevent-reader", "libudev"], ["--journal", "--no-journal"], ["--root", "-x"],
    ["--idle-timeout", "-1"], ["stray"], ["--", "--root"], ["--kernel"],
])
def test_fast_parse_leaves_help_errors_and_unusual_forms_to_argparse(argv: list[str]) -> None:
    assert settings_mod.parse_fast(argv) is None


def test_unusual_forms_still_work_or_fail_as_before(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    s, _ = parse_settings([f"--root={tmp_path}", "--max-work", "3"])   # argparse's forms
    assert s.root == str(tmp_path) and s.max_workers == 3
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--root", str(tmp_path), "--journal", "--no-journal"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--help"])
    assert exc.value.code == 0 and "--max-workers" in capsys.readouterr().out
