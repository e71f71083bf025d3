"""Process-group helpers for data-parallel calibration under `torchrun` (gloo on CPU, NCCL on GPU).

One process (no WORLD_SIZE, or WORLD_SIZE=1) gets `SINGLE`, whose collectives are identities, so the
single-process path runs exactly the code it ran before. Under torchrun every rank runs the same recipe;
work is split by contiguous index ranges (`shard`), results are gathered in rank order, and only rank 0
writes files (`on_main`: rank 0 runs, every rank gets the same result or raises the same UserError, so a
failure on rank 0 ends all ranks with one message instead of leaving the others blocked in a collective).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as torchdist

from ..core.device import resolve_device
from ..core.errors import UserError

T = TypeVar("T")
TIMEOUT_ENV = "DQ_DIST_TIMEOUT_S"  # how long a rank waits in a collective for the others (default 1800 s)


class AgreedError(UserError):
    """A UserError every rank raises alike (settings checks, rank 0's file errors sent to all): rank 0 alone
    prints it, so a bad input is one line however many processes run."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size and the backend (None: one process)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of 0..n-1 (the first n % world ranks take one more)."""
        return shard(n, self.rank, self.world)

    def barrier(self) -> None:
        if self.enabled:
            torchdist.barrier()

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's obj, in rank order (picklable objects; tensors travel on the CPU)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torchdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's obj on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torchdist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (a new tensor)."""
        if not self.enabled:
            return x
        y = x.detach().clone()
        torchdist.all_reduce(y)
        return y

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, its result (or its UserError) on every rank."""
        if not self.enabled:
            return fn()
        result: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                result = (True, fn())
            except UserError as err:
                result = (False, str(err))
        ok, value = self.broadcast(result)
        if not ok:
            raise AgreedError(value)
        return value

    def check_same(self, what: str, text: str) -> None:
        """Refuse to run when the ranks were started with different settings (e.g. per-node command lines)."""
        if not self.enabled:
            return
        digests = self.all_gather(hashlib.sha256(text.encode()).hexdigest())
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise AgreedError(f"ranks {', '.join(map(str, odd))} were started with other {what} than rank 0; "
                            "launch every rank with the same command line")


SINGLE = Dist()


def shard(n: int, rank: int, world: int) -> range:
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "cpu") -> Dist:
    """Join the process group torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR/PORT) describes.

    WORLD_SIZE unset or 1: SINGLE, nothing initialised. gloo on CPU, NCCL on CUDA (one GPU per local rank).
    """
    world = world_from_env()
    if world <= 1:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        resolve_device(device, local)  # no GPU: its one clear line
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if not torchdist.is_initialized():
        torchdist.init_process_group(backend, timeout=timeout)
    d = Dist(rank=rank, world=world, local_rank=local, backend=backend)
    _register(d)
    return d


def shutdown(d: Dist) -> None:
    if d.enabled and torchdist.is_initialized():
        torchdist.destroy_process_group()


def _register(d: Dist) -> None:
    """Leave (host, pid) of this rank in the launcher's store, so a survivor can name a rank that died."""
    try:
        store = torchdist.distributed_c10d._get_default_store()
        store.set(f"dq/pid/{d.rank}", f"{socket.gethostname()} {os.getpid()}")
    except Exception:  # naming a dead rank is a courtesy; the run does not depend on it
        pass


def dead_ranks(d: Dist) -> list[int]:
    """Ranks on this host whose process no longer exists (best effort; [] when unknown)."""
    dead = []
    try:
        store = torchdist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        for r in range(d.world):
            host, pid = store.get(f"dq/pid/{r}").decode().split()
            if host == socket.gethostname() and not _alive(int(pid)):
                dead.append(r)
    except Exception:
        return dead
    return dead


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead, not yet reaped
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def run_on_ranks(work: Callable[[Dist], None], device: str, out: Path) -> None:
    """Run `work` on this rank, ending a failed job with one line: an error every rank hit alike is printed by
    rank 0 alone; a lost peer is named, with how to resume from the finished blocks."""
    dist = init_from_env(device)
    if dist.enabled:  # the launcher stops the other ranks with SIGTERM when one dies: say why before going
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
    try:
        work(dist)
    except AgreedError as err:  # every rank raised it: rank 0 says it once, the others wait until it has
        if dist.is_main:        # (a launcher stops the remaining ranks as soon as one exits)
            print(f"error: {err}", file=sys.stderr, flush=True)
        dist.barrier()
        if dist.enabled:  # every rank is past the barrier: leave without gloo's teardown, which can abort (SIGABRT,
            sys.stdout.flush()  # seen once in CI on rank 0) when the peer's connection is already closed
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
    except UserError as err:
        raise UserError(f"rank {dist.rank} of {dist.world}: {err}" if dist.enabled else str(err)) from err
    except Exception as err:
        if not dist.enabled or not _is_peer_loss(err):
            raise
        raise UserError(_lost_peer(dist, err, out)) from err
    finally:
        if dist.enabled:  # on the way out: the error line is printed next, a late SIGTERM must not bury it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutdown(dist)


class _StoppedByLauncher(RuntimeError):
    """SIGTERM from torchrun's agent: another rank has exited."""


def _stopped_by_launcher(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _StoppedByLauncher("stopped by the launcher (SIGTERM)")


def _is_peer_loss(err: Exception) -> bool:
    """A collective that failed because another rank went away (gloo / NCCL / the launcher's store)."""
    text = str(err).lower()
    return isinstance(err, (torchdist.DistError, _StoppedByLauncher)) or (isinstance(err, RuntimeError) and any(
        w in text for w in ("gloo", "nccl", "connection", "peer", "timed out", "socket")))


def _lost_peer(dist: Dist, err: Exception, out: Path) -> str:
    """One line for a distributed failure: which rank died (when this host can tell) and how to go on."""
    dead = dead_ranks(dist)
    who = f"rank {', '.join(map(str, dead))} stopped" if dead else "a rank failed or stopped"
    first = str(err).strip().splitlines()[0].split(". This is typically")[0][:200] if str(err).strip() \
        else type(err).__name__
    return (f"rank {dist.rank} of {dist.world}: {who} ({type(err).__name__}: {first}); finished BKD blocks are "
            f"kept in {out}.progress: rerun with --resume (any number of processes)")
