import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def tiny_model():
    from harness.zoo import MODELS

    return MODELS["tiny_cnn"](num_classes=5, in_chans=3, seed=0)


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    target = torch.tensor([0, 2, 4])
    return x, target


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models train and explain several times faster so, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The SLURM integration test's outcome in one line at the end of the run (with -q a pass is a
# dot and a skip's reason is hidden): passed with its timings, or skipped with how to run it.
_slurm_reports = []


def pytest_runtest_logreport(report):
    if report.nodeid.startswith("tests/test_slurm.py") and (report.when == "call"
                                                            or not report.passed):
        _slurm_reports.append(report)


def pytest_terminal_summary(terminalreporter):
    for report in _slurm_reports:
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            terminalreporter.write_line(f"SLURM integration test skipped: "
                                        f"{reason.removeprefix('Skipped: ')}")
        else:
            timings = ", ".join(f"{k} {v:.1f} s" for k, v in report.user_properties)
            terminalreporter.write_line(f"SLURM integration test {report.outcome} on a real "
                                        f"cluster ({timings})")
