"""The all-reduce front end: nemokern's single-host fast paths, torch.distributed otherwise.

Tensor parallelism all-reduces small activations twice per layer, where gloo's (TCP) and NCCL's
fixed latency dominate. `all_reduce` sends such messages through the nemokern._C extension: a
/dev/shm workspace for CPU tensors, CUDA IPC buffers for CUDA tensors. Everything else (other
dtypes, several hosts, big messages, the extension missing) goes to torch.distributed.all_reduce.

Every rank must take the same path for the same call, so the choice depends only on what all ranks
share: the group, dtype, device type, byte size, whether a CUDA graph is being captured and the
environment (torchrun gives every rank the same one). Non-contiguous tensors are reduced through a
contiguous copy, never a different path.

Failures: a peer that does not arrive within NEMOKERN_ALLREDUCE_TIMEOUT raises TimeoutError, and
ranks passing different sizes or dtypes raise ValueError, on every rank. On the CPU path the call
itself raises. The CUDA path is asynchronous: its kernel records the failure and traps, which
leaves the process's CUDA context unusable, so the unfinished result can never be read (every
later CUDA call fails); the next all_reduce on that group raises the recorded error by name.

Environment (the first two are read at every call, the others when a group's workspace is set
up, i.e. at its first custom all-reduce; give every rank the same values):
    NEMOKERN_CUSTOM_ALLREDUCE=0           always use torch.distributed
    NEMOKERN_ALLREDUCE_MAX_BYTES=N        custom path only up to N bytes (default 16 MiB; CUDA:
                                          also the IPC buffer size, fixed at setup)
    NEMOKERN_ALLREDUCE_TIMEOUT=S          seconds to wait for a peer before TimeoutError (300)
    NEMOKERN_ALLREDUCE_ONE_SHOT_BYTES=N   one-shot below N bytes, reduce-scatter + all-gather above
    NEMOKERN_SHM_CHUNK_BYTES=N            CPU workspace bytes per rank and parity (4 MiB)
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import time
import warnings
import weakref

import torch
import torch.distributed as dist

from nemokern import env

MiB = 1 << 20
SHM_PREFIX = "nemokern_ar_"


def custom_enabled() -> bool:
    """False when NEMOKERN_CUSTOM_ALLREDUCE=0 (or false/off) turns the fast path off."""
    return env.flag("NEMOKERN_CUSTOM_ALLREDUCE")


def max_custom_bytes() -> int:
    return env.number("NEMOKERN_ALLREDUCE_MAX_BYTES")


def _extension():
    try:
        from nemokern import _C
    except ImportError:
        return None
    return _C


def _dtype_code(dtype: torch.dtype):
    """The extension's code for `dtype`, or None (unsupported dtype, or no extension)."""
    ext = _extension()
    if ext is None:
        return None
    return {torch.float32: ext.DTYPE_FLOAT32, torch.bfloat16: ext.DTYPE_BFLOAT16}.get(dtype)


def cleanup_stale_segments(shm_dir: str = "/dev/shm", min_age_s: float = 10.0) -> list[str]:
    """Unlink workspaces whose creating process is gone (it crashed before all ranks mapped).

    A healthy workspace has no name once every rank has mapped it, so only a crash between
    create and unlink leaves one. The creator holds an exclusive flock on its workspace until it
    unlinks the name, and the kernel drops that lock when the creator dies, whatever pid
    namespace it ran in (a pid in the name would be meaningless across containers). So a name
    whose lock can be taken is stale, unless it is younger than `min_age_s` seconds (a creator
    between shm_open and flock). Segments of other users are skipped. Returns the names removed.
    """
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SHM_PREFIX):
            continue
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, another user's, or not a plain file
        try:
            if time.time() - os.fstat(fd).st_mtime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # the creator is alive: its setup is in progress
            os.unlink(path)
            removed.append(name)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return removed


class _SetupFailed(RuntimeError):
    pass


class _GroupState:
    """What one process group needs, created collectively at its first custom all-reduce."""

    def __init__(self, group):
        # A weak reference: a cache that kept a gloo group alive past destroy_process_group()
        # made its threads die at interpreter exit (std::terminate).
        self._group_ref = weakref.ref(group)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._single_host = None
        self._comms = {}

    @property
    def group(self):
        return self._group_ref()

    def single_host(self) -> bool:
        if self._single_host is None:  # collective, once per group
            hosts = [None] * self.world
            dist.all_gather_object(hosts, socket.gethostname(), group=self.group)
            self._single_host = len(set(hosts)) == 1
        return self._single_host

    def _agree(self, error):
        """All ranks learn whether any rank failed its part of a setup step; all raise if so."""
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=self.group)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            r, e = bad[0]
            raise _SetupFailed(f"rank {r}: {e}")

    def comm(self, kind: str, device: torch.device):
        """The workspace of `kind` ("shm" or "cuda"), set up at first use; None if that failed.

        A failed setup is agreed on by all ranks (they all see every rank's error), so they
        all fall back to torch.distributed together, with a warning, from then on.
        """
        if kind not in self._comms:
            try:
                self._comms[kind] = self._make_shm() if kind == "shm" else self._make_cuda(device)
            except _SetupFailed as exc:
                warnings.warn(
                    f"nemokern all_reduce: {kind} workspace setup failed on {exc}; "
                    "this group uses torch.distributed.all_reduce instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._comms[kind] = None
        return self._comms[kind]

    def raise_if_cuda_failed(self):
        """Raise the failure a CUDA all-reduce kernel of this group recorded before it trapped,
        ahead of any CUDA call (which would only report the trap as a launch failure)."""
        comm = self._comms.get("cuda")
        if comm is not None:
            comm.raise_if_failed()

    def _make_shm(self):
        from nemokern import _C

        args = dict(
            rank=self.rank,
            world_size=self.world,
            chunk_bytes=env.number("NEMOKERN_SHM_CHUNK_BYTES"),
            timeout_s=env.number("NEMOKERN_ALLREDUCE_TIMEOUT"),
            one_shot_max_bytes=env.number("NEMOKERN_ALLREDUCE_ONE_SHOT_BYTES"),
        )
        comm, error, box = None, None, [None]
        if self.rank == 0:
            cleanup_stale_segments()
            # the pid is for people reading /dev/shm; liveness is the creator's flock
            box[0] = f"/{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
            try:
                comm = _C.ShmAllReduce(box[0], create=True, **args)
            except Exception as exc:  # noqa: BLE001 - forwarded to every rank below
                box[0] = f"error: {exc}"
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        if box[0].startswith("error: "):
            raise _SetupFailed(f"rank 0: {box[0][7:]}")
        if self.rank != 0:
            try:
                comm = _C.ShmAllReduce(box[0], create=False, **args)
            except Exception as exc:  # noqa: BLE001
                error = str(exc)
        try:
            self._agree(error)
        finally:
            if comm is not None:
                comm.unlink()  # every rank mapped it (or setup failed): drop the name now
        return comm

    def _make_cuda(self, device):
        from nemokern import _C

        comm, error, handle = None, None, b""
        try:
            comm = _C.CudaAllReduce(
                rank=self.rank,
                world_size=self.world,
                device=device.index if device.index is not None else torch.cuda.current_device(),
                buffer_bytes=max_custom_bytes(),
                timeout_s=env.number("NEMOKERN_ALLREDUCE_TIMEOUT"),
                one_shot_max_bytes=env.number("NEMOKERN_ALLREDUCE_ONE_SHOT_BYTES"),
            )
            handle = comm.ipc_handle()
        except Exception as exc:  # noqa: BLE001
            error = str(exc)
        self._agree(error)
        handles = [None] * self.world
        dist.all_gather_object(handles, handle, group=self.group)
        try:
            comm.open_peers(handles)
        except Exception as exc:  # noqa: BLE001
            error = str(exc)
        self._agree(error)
        return comm


_STATES: dict[int, _GroupState] = {}


def _state(group) -> _GroupState:
    group = group if group is not None else dist.group.WORLD
    st = _STATES.get(id(group))
    if st is None or st.group is not group:  # new group, or a dead one's id reused
        st = _STATES[id(group)] = _GroupState(group)
    return st


def reset() -> None:
    """Drop every cached workspace (call before destroying process groups, or in tests)."""
    _STATES.clear()


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph."""
    return torch.cuda.is_current_stream_capturing()


def _custom_kind(device: torch.device, dtype: torch.dtype, nbytes: int):
    """The custom back end ("shm" or "cuda") for a tensor, judged before its group; None means
    torch.distributed.

    While a CUDA graph is being captured the CUDA path is not taken: its kernels carry step
    numbers that a replay would repeat, skipping the barriers (and the extension refuses
    capture). torch.distributed (NCCL) supports capture.
    """
    if not custom_enabled() or _dtype_code(dtype) is None or nbytes > max_custom_bytes():
        return None
    if device.type == "cpu":
        return "shm"
    if device.type == "cuda" and _extension().with_cuda and not _capturing():
        return "cuda"
    return None


def _custom_comm(tensor: torch.Tensor, group):
    """The extension object that will reduce `tensor`, or None for torch.distributed."""
    if not dist.is_initialized():
        return None
    st = _state(group)
    if tensor.is_cuda:
        st.raise_if_cuda_failed()
    nbytes = tensor.numel() * tensor.element_size()
    kind = _custom_kind(tensor.device, tensor.dtype, nbytes)
    if kind is None:
        return None
    if st.world == 1 or st.world > _extension().MAX_RANKS or not st.single_host():
        return None
    comm = st.comm(kind, tensor.device)
    if kind == "cuda" and comm is not None and nbytes > comm.buffer_bytes:
        return None  # NEMOKERN_ALLREDUCE_MAX_BYTES was raised after the IPC buffer was sized
    return comm


def all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` (any shape [...]) over the ranks of `group`, in place; returns `tensor`.

    fp32/bf16 tensors of at most NEMOKERN_ALLREDUCE_MAX_BYTES on a single-host group take the
    custom path: every rank gets bitwise the same result, the rank-ordered sum
    ((x_0 + x_1) + x_2) + ... accumulated in fp32. Anything else, and CUDA tensors while a
    CUDA graph is being captured, calls torch.distributed.all_reduce(tensor, SUM, group).
    Collective: every rank of the group must call it with the same shape and dtype, in the same
    order relative to other collectives (see the module docstring for what a failure raises).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    comm = _custom_comm(tensor, group)
    if comm is None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    code = _dtype_code(work.dtype)
    if work.is_cuda:
        stream = torch.cuda.current_stream(work.device).cuda_stream
        comm.all_reduce(work.data_ptr(), work.numel(), code, stream)
    else:
        comm.all_reduce(work.data_ptr(), work.numel(), code)
    if work is not tensor:
        tensor.copy_(work)
    return tensor
