"""The kernel layer, the loader and kmodctl load/unload on Debian's real kernel (QEMU guest).

Python is slow in the guest, so ``test_kernel_guest.py`` runs once inside it,
doing every step in one process and printing a JSON report; each test here
asserts on one section of that report.  Where kmod's behaviour is the
reference, the guest ran ``modprobe``/``rmmod``/``insmod`` too.
"""

from __future__ import annotations

import errno as E
import json
import sys
from typing import Any

import pytest

from testbed.vm import VM

HDA_CHAIN = {"soundcore", "snd", "snd_timer", "snd_pcm", "snd_hwdep", "snd_hda_core",
             "snd_hda_codec", "snd_intel_sdw_acpi", "snd_intel_dspcfg", "snd_hda_intel"}


@pytest.fixture(scope="module")
def report(vm: VM) -> dict[str, Any]:
    r = vm.run([sys.executable, "tests/vm/test_kernel_guest.py"], timeout=1200)
    assert r.rc == 0, f"guest checks failed (rc={r.rc})\n{r.stderr[-4000:]}"
    try:
        data: dict[str, Any] = json.loads(r.stdout)
    except ValueError as e:
        raise AssertionError(f"guest printed no JSON report: {e}\n{r.stdout[-2000:]}\n"
                             f"{r.stderr[-2000:]}") from e
    return data


def section(report: dict[str, Any], name: str) -> dict[str, Any]:
    data = report[name]
    assert data["ok"], f"guest check {name} crashed:\n{data.get('traceback')}"
    return data


def statuses(results: list[dict[str, Any]]) -> dict[str, str]:
    return {r["name"]: r["status"] for r in results}


def test_guest_kernel_has_modules_and_no_in_kernel_decompression(report: dict[str, Any]) -> None:
    env = section(report, "env")
    assert env["version"].startswith("6.1.")
    assert env["supports_modules"] and not env["modules_disabled"]
    assert env["euid"] == 0
    # Debian 12's kernel cannot decompress modules: compressed files go through user space.
    assert env["kernel_compression"] is None


def test_e1000_load_binds_device_and_unloads(report: dict[str, Any]) -> None:
    s = section(report, "e1000")
    assert s["before"] == {"e1000": "absent"}
    assert statuses(s["load"]) == {"e1000": "loaded"}
    assert s["state_after_load"] == {"e1000": "live"}
    assert s["proc_modules"]["state"] == "Live" and s["proc_modules"]["size"] > 0
    # The emulated NIC is bound to the driver: drivers/pci:e1000/<device> is found.
    assert s["bound_devices"] == 1
    # A plain .ko goes through finit_module without flags.
    assert s["syscalls"] == [["finit_module", "e1000", 0]]
    assert statuses(s["unload"]) == {"e1000": "unloaded"}
    assert s["state_after_unload"] == {"e1000": "absent"}


def test_snd_hda_intel_with_its_dependencies_in_order(report: dict[str, Any]) -> None:
    s = section(report, "snd_hda")
    assert set(s["plan"]) == HDA_CHAIN and s["plan"][-1] == "snd_hda_intel"
    assert s["loaded_before"] == []
    assert all(r["status"] == "loaded" for r in s["load"]), s["load"]
    # Exactly the modules modprobe loads for the same request, in plan order.
    assert s["modprobe"]["rc"] == 0
    assert set(s["ours_loaded"]) == set(s["modprobe_loaded"]) == HDA_CHAIN
    assert s["order_loaded"] == s["plan"]
    assert set(s["snd_holders_proc"]) == set(s["snd_holders_sysfs"]) == {
        "snd_hda_codec", "snd_hda_intel", "snd_hwdep", "snd_pcm", "snd_timer"}
    assert s["snd_refcount"] == 5


def test_unloading_a_module_with_holders_is_ebusy(report: dict[str, Any]) -> None:
    s = section(report, "snd_hda")
    busy = s["unload_snd"]
    assert busy["status"] == "failed" and busy["errno"] == E.EBUSY
    assert busy["error"] == ("snd: in use by: snd_hda_codec snd_hda_intel snd_hwdep "
                             "snd_pcm snd_timer")
    assert s["unload_snd_syscalls"] == []          # refused before asking the kernel
    # The kernel's own refusal (EWOULDBLOCK) surfaces as EBUSY with the same message.
    assert s["raw_unload_snd"]["errno"] == E.EBUSY
    assert "in use by" in s["raw_unload_snd"]["message"]
    assert s["rmmod_snd"]["rc"] == 1 and "in use by" in s["rmmod_snd"]["stderr"]
    assert s["state_snd_after_refusals"] == {"snd": "live"}


def test_recursive_unload_removes_unused_dependencies(report: dict[str, Any]) -> None:
    s = section(report, "snd_hda")
    results = s["unload_r"]
    assert results[0]["name"] == "snd_hda_intel"
    assert set(statuses(results).values()) == {"unloaded"}
    assert set(statuses(results)) == HDA_CHAIN
    assert s["left_after_unload_r"] == []
    # modprobe -r is the reference for the semantics; it leaves at least as much behind.
    assert s["modprobe_r"]["rc"] == 0
    assert set(s["after_modprobe_r"]) <= HDA_CHAIN


def test_module_option_reaches_sysfs_and_bad_values_are_clear(report: dict[str, Any]) -> None:
    s = section(report, "loop_params")
    assert s["before"] == {"loop": "absent"}     # loop is a module in this tree, not builtin
    assert s["plan"][0][2] == "max_loop=13"
    assert statuses(s["load"]) == {"loop": "loaded"}
    assert s["parameters"]["max_loop"] == "13"
    assert statuses(s["unload"]) == {"loop": "unloaded"}
    assert s["bad_value"]["errno"] == E.EINVAL
    assert "max_loop=notanumber" in s["bad_value"]["message"]
    assert "see dmesg" in s["bad_value"]["message"]
    assert any("invalid for parameter" in line for line in s["bad_value_dmesg"])
    assert s["state_after_bad_value"] == {"loop": "absent"}


def test_unknown_parameter_kernel_ignores_kmodctl_refuses(report: dict[str, Any]) -> None:
    s = section(report, "loop_params")
    # The kernel (and modprobe) load the module and only log the unknown parameter...
    assert s["unknown_param_raw"] == {"errno": 0, "inserted": True}
    assert any("unknown parameter 'bogus_param' ignored" in line
               for line in s["unknown_param_dmesg"])
    assert s["modprobe_unknown_param"]["rc"] == 0
    assert s["modprobe_unknown_state"] == {"loop": "live"}
    # ...kmodctl checks the administrator's parameters against the module first.
    c = section(report, "kmodctl")
    r = c["load_unknown_param"]
    assert r["rc"] == 1
    assert "loop: unknown parameter bogus_param" in r["stderr"]
    assert "max_loop" in r["stderr"]
    assert c["state_loop_after_unknown"] == {"loop": "absent"}


@pytest.mark.parametrize("request_,suffix", [("loop", ".ko.xz"), ("e1000", ".ko.zst")])
def test_recompressed_module_loads_through_user_space(report: dict[str, Any], request_: str,
                                                      suffix: str) -> None:
    s = section(report, "compressed")
    m = s["modules"][request_]
    assert m["paths"][-1].endswith(suffix)
    assert statuses(m["load"]) == {request_: "loaded"}
    assert m["state"] == {request_: "live"}
    # No in-kernel decompression: the decompressed image went through init_module.
    assert m["syscalls"] == [["init_module", request_, 0]]
    assert statuses(m["unload"]) == {request_: "unloaded"}
    assert m["state_after_unload"] == {request_: "absent"}


def test_recompressed_module_with_dependency_and_gzip(report: dict[str, Any]) -> None:
    s = section(report, "compressed")
    m = s["modules"]["snd"]
    assert [p.rsplit("/", 1)[1] for p in m["paths"]] == ["soundcore.ko.zst", "snd.ko.xz"]
    assert statuses(m["load"]) == {"soundcore": "loaded", "snd": "loaded"}
    assert [c[0] for c in m["syscalls"]] == ["init_module", "init_module"]
    assert m["state_after_unload"] == {"soundcore": "absent", "snd": "absent"}
    assert s["gzip_inserted"] is True
    assert s["gzip_syscalls"] == [["init_module", "loop", 0]]
    assert s["gzip_state"] == {"loop": "live"}


def test_kmodctl_on_compressed_tree(report: dict[str, Any]) -> None:
    s = section(report, "compressed")
    load = s["kmodctl_load"]
    assert load["rc"] == 0, load
    assert load["json"]["ok"] and load["json"]["targets"] == ["snd"]
    assert s["kmodctl_state"] == {"snd": "live", "soundcore": "live"}
    unload = s["kmodctl_unload"]
    assert unload["rc"] == 0, unload
    assert s["kmodctl_state_after"] == {"snd": "absent", "soundcore": "absent"}


def test_concurrent_loads_of_one_module_give_one_insert_and_eexist(
        report: dict[str, Any]) -> None:
    s = section(report, "concurrent")
    for rnd in s["rounds"]:
        # Every thread succeeded: exactly one inserted, the others saw EEXIST (False).
        assert sorted(rnd["results"], key=str) == [False] * (rnd["threads"] - 1) + [True], rnd
        assert rnd["state"] == {"loop": "live"}
    assert sorted(s["loader_statuses"]) == ["already", "already", "loaded"]


def test_corrupt_modules_give_clear_errors(report: dict[str, Any]) -> None:
    s = section(report, "corrupt")
    for label in ("garbage", "truncated"):
        assert s[label]["errno"] == E.ENOEXEC
        assert "invalid module format" in s[label]["message"]
        # kmod says the same thing.
        assert "Invalid module format" in s[label + "_insmod"]["stderr"]
    assert "not a valid kernel module" in s["truncated"]["message"]
    # A module for another kernel release is told apart from a corrupt one.
    assert s["patched"]
    # The patched file with its now wrong signature: EKEYREJECTED, even though
    # Debian's kernel does not require signatures.
    assert s["bad_signature"]["errno"] == E.EKEYREJECTED
    assert "signature rejected" in s["bad_signature"]["message"]
    assert s["bad_signature_insmod"]["rc"] == 1
    assert s["other_kernel"]["errno"] == E.ENOEXEC
    assert (f"built for kernel {s['other_release']}, this kernel is"
            in s["other_kernel"]["message"])
    assert "Invalid module format" in s["other_kernel_insmod"]["stderr"]
    assert s["state_loop"] == {"loop": "absent"}
    assert s["bad_xz"]["errno"] == E.ENOEXEC
    assert "corrupt xz stream" in s["bad_xz"]["message"]
    assert s["state_e1000"] == {"e1000": "absent"}
    missing = s["missing_file"][0]
    assert missing["status"] == "failed" and missing["errno"] == E.ENOENT
    assert "cannot open" in missing["error"]


def test_kmodctl_load_unload_end_to_end(report: dict[str, Any]) -> None:
    s = section(report, "kmodctl")
    alias = s["load_alias"]
    assert alias["rc"] == 0 and alias["json"]["targets"] == ["e1000"]
    assert statuses(alias["json"]["results"]) == {"e1000": "loaded"}
    assert s["state_e1000"] == {"e1000": "live"}
    assert s["load_again"]["rc"] == 0 and s["load_again"]["stdout"] == "e1000 already\n"
    assert s["unload"]["rc"] == 0 and s["unload"]["stdout"] == "unloaded e1000\n"
    assert s["unload_again"]["rc"] == 1
    assert s["unload_again"]["stderr"] == "kmodctl unload: e1000: not loaded\n"
    assert s["load_param"]["rc"] == 0 and s["loop_params"]["max_loop"] == "7"
    assert s["load_hda"]["rc"] == 0
    busy = s["unload_busy"]
    assert busy["rc"] == 1 and "snd: in use by:" in busy["stderr"]
    r = s["unload_hda_r"]
    assert r["rc"] == 0 and r["json"]["ok"]
    assert set(statuses(r["json"]["results"])) == HDA_CHAIN
    assert set(s["hda_state_after"].values()) == {"absent"}
    missing = s["load_missing"]
    assert missing["rc"] == 1 and "no_such_module_xyz: module not found" in missing["stderr"]
