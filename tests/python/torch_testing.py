"""What the ztier.torch tests share: torch imported or the reason it is not,
and a scratch directory per test."""

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (os.path.join(ROOT, "python"), os.path.join(ROOT, "scripts"), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

try:
    import torch  # noqa: F401
except ImportError as e:  # the tests are skipped, with the reason
    torch = None
    TORCH_MISSING = f"PyTorch is not importable here ({e}); use /usr/bin/python3 with python3-torch"
else:
    TORCH_MISSING = ""


def tmpdir(test, prefix: str = "ztier_torch_") -> str:
    """A directory under $ZTIER_TEST_TMPDIR (else the working directory),
    removed when `test` ends."""
    base = os.environ.get("ZTIER_TEST_TMPDIR") or os.getcwd()
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def run_ranks(world: int, rank_main) -> None:
    """Runs rank_main(rank, group) for each of `world` ranks on a thread of
    its own, sharing one ztier.LocalGroup; raises the first rank's error."""
    import threading
    import ztier
    group = ztier.LocalGroup(world)
    errors = []

    def run(rank):
        try:
            rank_main(rank, group)
        except BaseException as e:  # reported by the calling thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    group.close()
    if errors:
        raise errors[0]


def training_config(path: str) -> str:
    """The training tests' config: parameters and ztier's optimizer state on
    NVMe under `path` (the optimizer in sub-groups of 5000 elements: the tiny
    GPT has ~27k, so several; two buffers)."""
    os.makedirs(path, exist_ok=True)
    return (
        "optimizer:\n"
        f"  paths: [\"{path}/opt\"]\n"
        "  buffer_count: 2\n"
        "  sub_group_size: 5000\n"
        "  threads: 2\n"
        "tiers:\n"
        "  params: nvme\n"
        "  host: {pin_memory: false}\n"
        f"  nvme: {{paths: [\"{path}\"], buffer_count: 8, buffer_size: 8192,\n"
        "         buffer_element_bytes: 4}\n"
        "coordinator: {param_persistence_threshold: 0, max_reuse_distance: 0}\n"
        "io: {register_buffers: false}\n")
