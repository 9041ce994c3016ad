"""The harness's L1 watch: which L2 exits prove that the L1 emulator gave an L2 vCPU the L1's own state."""
from __future__ import annotations

import pytest

from katapy import paths
from katapy.testing import l1_watch

# a kvm_exit line as the L1's tracefs printed it when a 2-vCPU L2 on the built-in VMM triple-faulted in the harness
CAUGHT = ("          python-81      [000] .....    35.147712: kvm_exit: vcpu 1 reason npf rip 0xffffffff815011bc "
          "info1 0x0000000200000006 info2 0x0000000000eb9ff8 intr_info 0x00000000 error_code 0x00000000")


def test_parse_reads_the_l2_vcpu_reason_and_rip_of_each_caught_exit():
    trace = "# tracer: nop\n#\n" + CAUGHT + "\n" + CAUGHT.replace("vcpu 1", "vcpu 0").replace("npf", "shutdown")
    leaks = l1_watch.parse(trace, (0xFFFFFFFF815011BC,))
    assert [(x.vcpu, x.reason, x.rip, x.task, x.proven) for x in leaks] == [
        (1, "npf", 0xFFFFFFFF815011BC, "python-81", True), (0, "shutdown", 0xFFFFFFFF815011BC, "python-81", True)]
    assert leaks[0].seconds == pytest.approx(35.147712)
    assert "L2 vCPU 1" in leaks[0].describe() and "0xffffffff815011bc" in leaks[0].describe()
    assert "L1 emulator fault" in leaks[0].describe()


def test_a_shutdown_elsewhere_is_reported_but_not_blamed_on_the_l1():
    line = ("  python-81  [000] .....  35.148082: kvm_exit: vcpu 1 reason shutdown rip 0xffffffff81229026 info1 0x0 "
            "info2 0x0 intr_info 0x80000b0e error_code 0x00000010")
    (leak,) = l1_watch.parse(line, (0xFFFFFFFF815011BC,))
    assert not leak.proven and leak.intr_info == 0x80000B0E
    assert "cause not proven" in leak.describe() and "0x80000b0e" in leak.describe()


def test_parse_ignores_everything_but_kvm_exit_lines():
    assert l1_watch.parse("# tracer: nop\n python-80 [001] ..... 1.0: kvm_entry: vcpu 0, rip 0x1000\n\n", (0x1000,)) == []


def test_the_filter_names_every_address():
    assert l1_watch.trace_filter((0x10, 0x20)) == "exit_reason == 0x7f || guest_rip == 0x10 || guest_rip == 0x20"


def test_post_vmrun_addresses_of_the_harness_kernel_follow_a_vmrun_in_the_svm_entry_code():
    vmlinux = paths.harness_vmlinux()
    if not vmlinux.exists():
        pytest.skip(f"{vmlinux} is not built (make kernel)")
    from elftools.elf.elffile import ELFFile

    addrs = l1_watch.vmrun_resume_addresses(vmlinux)
    assert addrs, "no VMRUN found in __svm_vcpu_run"
    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        run = elf.get_section_by_name(".symtab").get_symbol_by_name("__svm_vcpu_run")[0]
        for a in addrs:
            assert l1_watch._read(elf, a - 3, 3) == l1_watch.VMRUN
        assert any(run["st_value"] < a < run["st_value"] + run["st_size"] for a in addrs)
