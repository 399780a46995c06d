"""The processes of one run (torchrun starts one per GPU) and how they wait for each other: below job/pipeline.py and
job/stages/, which both need it.

    >>> from job import distributed
    >>> if distributed.state().is_main_process: ...      # one process uploads
    >>> with distributed.first_process_per_node(): ...    # the node's first process downloads, the others wait
"""

from __future__ import annotations

import contextlib
import os

from job.errors import TransientError


class _OneProcess:
    """The state of a run started without torchrun: what accelerate's would say, without importing torch (seconds)
    before the settings, storage and data are checked."""

    num_processes = 1
    process_index = local_process_index = 0
    is_main_process = is_local_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def state():
    """accelerate's process state, as the Trainer will set it up (gloo on CPU, NCCL on GPUs); one process without
    torchrun (no WORLD_SIZE above 1, as accelerate reads it)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return _OneProcess()
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def first_process_per_node():
    """With several processes (torchrun), let the node's first one download while the others wait. When the first
    one fails (bad data, say) the others' wait ends with a closed connection: theirs is not the error to report."""
    st = state()
    if st.num_processes == 1:
        yield
        return
    if not st.is_local_main_process:
        wait_for_everyone(st)
    yield
    if st.is_local_main_process:
        wait_for_everyone(st)


def wait_for_everyone(st) -> None:
    try:
        st.wait_for_everyone()
    except RuntimeError as exc:  # gloo and NCCL report a peer that exited as RuntimeError subclasses
        raise TransientError(f"process {st.process_index}: another process of this run stopped while this one "
                             "waited for it; that process's error says why") from exc


def same_on_every_process(run_id: str) -> str:
    """A generated run id must be the same on every rank: rank 0's wins."""
    if state().num_processes == 1:
        return run_id
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([run_id], from_process=0)[0]
