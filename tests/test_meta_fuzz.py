"""Random LoRABatchMeta contents against every backend that runs here (tests/meta_fuzz_worker.py).

The hypothesis loop runs in a subprocess: a kernel that reads or writes out of bounds can kill
the process (a segfault), which must fail this test with the signal and the case it was running,
not take pytest down with it. The worker checks guard regions around y and h bit for bit, NaN
guards around every input, and that no backend entry point raises (docs/kernels.md, "Whatever
the metadata holds").
"""
import os
import signal
import subprocess
import sys

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_fuzz_worker.py")
# ~35 s on one core of the CI machine (the Triton interpreter dominates); derandomized, so
# every run draws the same cases.
EXAMPLES = int(os.environ.get("OPENLORA_META_FUZZ_EXAMPLES", "150"))


def run_worker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONFAULTHANDLER="1")
    return subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, env=env, timeout=timeout)


def failure_report(out: subprocess.CompletedProcess) -> str:
    """What a failed run says: how it ended (the signal of a crash), its last case, the tails."""
    if out.returncode < 0:
        how = f"killed by {signal.Signals(-out.returncode).name}"
    else:
        how = f"exit status {out.returncode}"
    cases = [ln for ln in out.stdout.splitlines() if ln.startswith("CASE ")]
    last = cases[-1] if cases else "(no case started)"
    failed = [ln for ln in out.stdout.splitlines() if ln.startswith("FAILED")]
    return (f"meta fuzz worker: {how}\nlast case: {last}\n" + "\n".join(failed[-3:])
            + f"\n--- stdout tail ---\n{out.stdout[-3000:]}\n--- stderr tail ---\n{out.stderr[-3000:]}")


def test_garbage_metadata_never_escapes_y_or_h_on_any_backend():
    out = run_worker("--examples", str(EXAMPLES))
    assert out.returncode == 0, failure_report(out)
    assert "cases passed" in out.stdout, failure_report(out)


def test_a_crashing_worker_is_reported_with_its_signal_and_last_case():
    out = run_worker("--selftest-crash", timeout=60)
    assert out.returncode == -signal.SIGSEGV
    report = failure_report(out)
    assert "killed by SIGSEGV" in report and "last case: CASE 0: selftest" in report
