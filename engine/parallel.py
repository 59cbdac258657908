"""Tensor parallelism: one process per GPU (or, on the CPU, per gloo rank), kept in lockstep.

Rank 0 is the engine as always: it owns the scheduler, the sessions and the decoding loops, and
its Runner is a `LeaderRunner`. Every Runner call that touches the model (a step, moving K/V
slots, parking and restoring a document's K/V) is first sent to the followers as a small msgpack
message on their stdin, then run on rank 0; each follower (`python -m engine.parallel`) makes the
same call on its own shard, so the all-reduces inside the forward (model.Shard) pair up, and CUDA
graphs, NCCL collectives included, are captured at the same moments on every rank. Followers never
answer: rank 0's outputs are the engine's. A pipe rather than a collective carries the messages
because an idle engine may wait for hours, which no collective's timeout allows, and because a
closed pipe tells a follower that the engine is gone.

Lifecycle: the followers load their shards while rank 0 loads its own, then say "ready" on their
stdout; only then does rank 0 join the process group, so a follower that fails to load is an error
at start, not a hang. Rank 0 closes the pipes at exit (the followers then leave), and exits itself,
saying why, if a follower dies while it serves: without it no step can complete.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING

import msgpack
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .errors import AheadError
from .model import ModelArgs, Shard, Transformer
from .runner import Runner, StepShape, sync

if TYPE_CHECKING:
    from .loading import Checkpoint

Log = Callable[[str], None]

# NVLink multicast (NVLS) can put a shared host's GPUs out of service; it stays off unless the user
# turns it on (environment of rank 0 and, inherited, of its followers).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
JOIN_TIMEOUT = timedelta(seconds=120)  # followers join the group right after saying "ready"
READY = b"ready\n"


@dataclass(frozen=True)
class FollowerSpec:
    """What a follower needs to build its shard; JSON on its command line."""

    world: int
    port: int  # rank 0's TCPStore on 127.0.0.1, the group's rendezvous
    device: str  # "cpu" or "cuda" (a follower of rank r uses cuda:r)
    dtype: str  # a torch dtype's name: "float32", "bfloat16"
    max_seq_len: int
    use_graphs: bool
    threads: int  # torch threads per rank on the CPU
    source: str | None = None  # the checkpoint to load (Checkpoint.source), or
    random: dict | None = None  # random weights of these ModelArgs (benchmarks)

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


def rank_device(device: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")


def random_model(args: ModelArgs, max_seq_len: int, shard: Shard, device: torch.device,
                 dtype: torch.dtype) -> Transformer:
    """`shard`'s part of a model of this shape with N(0, 0.02) weights and unit norms, made on the
    device: benchmarks of a 32B shape cannot afford a host copy of its weights."""
    torch.manual_seed(shard.rank)
    with torch.device("meta"):
        model = Transformer(args, max_seq_len, shard).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.setup_cache()
    return model.eval()


def time_all_reduce(rows: int, dim: int, count: int, reps: int, device: torch.device, dtype: torch.dtype) -> float:
    """Median ms of `count` all-reduces of [rows, dim], what one step of `rows` tokens sends (as a
    CUDA graph on a GPU, as the steps run). Every rank must call it with the same arguments."""
    x = torch.zeros(rows, dim, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(count):
            dist.all_reduce(x)

    run()  # connections, NCCL channels
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    times = []
    for _ in range(reps):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


# -- rank 0 -------------------------------------------------------------------------------------------
class TensorParallel:
    """Rank 0's side: the follower processes, the process group, and the runner that mirrors to them."""

    def __init__(self, spec: FollowerSpec, store: dist.TCPStore, followers: list[subprocess.Popen], log: Log):
        self.spec = spec
        self.store = store  # the rendezvous lives as long as the group
        self.followers = followers
        self.log = log
        self.world = spec.world
        self.device = rank_device(spec.device, 0)
        self.shard = Shard(0, spec.world)
        self.closing = False
        atexit.register(self.close)

    @classmethod
    def launch(cls, world: int, args: ModelArgs, *, device: torch.device, dtype: torch.dtype, max_seq_len: int,
               use_graphs: bool = True, source: str | None = None, log: Log) -> TensorParallel:
        """Check that the model splits over `world` processes, then start the followers, which load
        `source` (None: random weights of `args`) while the caller builds rank 0's shard."""
        if why := args.shard_error(world):
            raise AheadError(f"--tp {world}: the model cannot be split by heads: {why}")
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise AheadError(f"--tp {world} needs {world} GPUs, {torch.cuda.device_count()} visible")
        if source is not None and not Path(source).exists():
            raise AheadError(f"--tp needs a model the other ranks can load themselves (a .gguf, a directory or a "
                             f"Hugging Face id), not weights built in memory ({source})")
        for name, value in MULTICAST_OFF.items():
            os.environ.setdefault(name, value)
        threads = torch.get_num_threads()
        if device.type == "cpu":  # the ranks share the cores
            threads = max(1, threads // world)
            torch.set_num_threads(threads)
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=JOIN_TIMEOUT, wait_for_workers=False)
        spec = FollowerSpec(world, store.port, device.type, str(dtype).removeprefix("torch."), max_seq_len,
                            use_graphs, threads, source, None if source is not None else asdict(args))
        # The followers run this very package, wherever the current directory is.
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        followers = [
            subprocess.Popen([sys.executable, "-m", "engine.parallel", str(rank), json.dumps(asdict(spec))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)  # stderr: rank 0's
            for rank in range(1, world)
        ]
        log(f"ahead: tensor parallel over {world} {'GPUs' if device.type == 'cuda' else 'CPU processes'} "
            f"({spec.backend}); started ranks 1-{world - 1}")
        return cls(spec, store, followers, log)

    @classmethod
    def for_checkpoint(cls, world: int, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                       use_graphs: bool, log: Log) -> TensorParallel:
        """`launch` for an engine: the followers load the checkpoint rank 0 loaded, from where it came."""
        try:
            args = ModelArgs.from_hf_config(ckpt.config)
        except ValueError as exc:
            raise AheadError(f"{ckpt.source}: {exc}") from None
        return cls.launch(world, args, device=device, dtype=dtype, max_seq_len=max_seq_len, use_graphs=use_graphs,
                          source=ckpt.source, log=log)

    def connect(self, model: Transformer) -> LeaderRunner:
        """Once every follower has built its shard, join the process group; returns rank 0's runner."""
        for rank, proc in enumerate(self.followers, 1):
            if proc.stdout.readline() != READY:
                code = proc.wait()
                self.close()
                raise AheadError(f"tensor-parallel rank {rank} failed while building its shard (exit code {code}); "
                                 "its error is above")
        join_group(self.spec, 0, self.store)
        for rank, proc in enumerate(self.followers, 1):
            threading.Thread(target=self._watch, args=(rank, proc), name=f"ahead-tp-rank{rank}", daemon=True).start()
        return LeaderRunner(model, use_graphs=self.spec.use_graphs, tp=self)

    def send(self, data: bytes) -> None:
        for rank, proc in enumerate(self.followers, 1):
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                raise AheadError(f"tensor-parallel rank {rank} is gone (exit code {proc.poll()})") from None

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self.closing:
            self.log(f"ahead: error: tensor-parallel rank {rank} exited (code {code}); the engine cannot compute "
                     "a step without it, so it exits too")
            os._exit(1)

    def close(self) -> None:
        """Stop the followers (they leave when their stdin closes) and leave the group."""
        if self.closing:
            return
        self.closing = True
        for proc in self.followers:
            try:
                proc.stdin.close()
            except OSError:
                pass
        leave_group()
        for proc in self.followers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(eq=False)
class LeaderRunner(Runner):
    """Rank 0's runner: each call that touches the model is sent to the followers, then run here."""

    tp: TensorParallel | None = None
    _shapes_sent: set[str] = field(default_factory=set)
    _handles: dict[int, int] = field(default_factory=dict)  # id(saved K/V) -> the followers' handle for it
    _next_handle: itertools.count = field(default_factory=itertools.count)
    _freed: list[int] = field(default_factory=list)  # handles whose K/V rank 0 has let go of
    _queued: list[bytes] = field(default_factory=list)  # messages that ride along with the next send

    def _send(self, message: dict) -> None:
        """Send `message` after everything queued: one pipe write per model call."""
        if self._freed:  # the followers drop their copies of parked K/V that rank 0 dropped
            freed, self._freed = self._freed, []
            self._queue({"op": "drop", "ids": freed})
        data = b"".join([*self._queued, msgpack.packb(message)])
        self._queued.clear()
        self.tp.send(data)

    def _queue(self, message: dict) -> None:
        """A message the followers need only once the next step runs: a tree step's layout and slot moves go
        out with that step, not as writes of their own."""
        self._queued.append(msgpack.packb(message))

    def _send_layout(self, shape: StepShape, rel_pos: Tensor | np.ndarray, local: Tensor | np.ndarray) -> None:
        self._queue({"op": "layout", "name": shape.name, "rel_pos": np.asarray(rel_pos).tolist(),
                    "local": np.asarray(local, dtype=bool).tobytes(), "logits": shape.logits, "moves": shape.moves,
                    "causal": shape.causal})

    def set_layout(self, shape: StepShape, rel_pos: Tensor | np.ndarray, local: Tensor | np.ndarray) -> None:
        self._send_layout(shape, rel_pos, local)
        self._shapes_sent.add(shape.name)
        super().set_layout(shape, rel_pos, local)

    def step(self, shape: StepShape, tokens: list[int] | Tensor | np.ndarray, base: int, graph: bool = True):
        if base + shape.size > self.capacity:
            return super().step(shape, tokens, base, graph)  # raises before the model runs: nothing to mirror
        if shape.name not in self._shapes_sent:
            self._send_layout(shape, shape.rel_pos, shape.local)
            self._shapes_sent.add(shape.name)
        ids = tokens.tolist() if isinstance(tokens, Tensor | np.ndarray) else list(tokens)
        self._send({"op": "step", "shape": shape.name, "tokens": ids, "base": base, "graph": graph})
        return super().step(shape, tokens, base, graph)

    def move_slots(self, src: list[int], dst: list[int]) -> None:
        if src:  # made by the next step or save on each rank alike: the message rides with that one
            self._queue({"op": "move", "src": list(src), "dst": list(dst)})
        super().move_slots(src, dst)

    def save(self, n: int) -> Tensor:
        handle = next(self._next_handle)
        self._send({"op": "save", "id": handle, "n": n})
        try:
            saved = super().save(n)
        except BaseException:
            self._freed.append(handle)
            raise
        self._handles[id(saved)] = handle
        weakref.finalize(saved, self._release, id(saved), handle)  # parked K/V are dropped by forgetting them
        return saved

    def _release(self, key: int, handle: int) -> None:
        self._handles.pop(key, None)
        self._freed.append(handle)

    def restore(self, saved: Tensor) -> None:
        handle = self._handles.get(id(saved))
        if handle is None:
            raise ValueError("restore() takes K/V that this runner's save() returned")
        self._send({"op": "restore", "id": handle})
        super().restore(saved)

    def time_all_reduce(self, rows: int, count: int, reps: int) -> float:
        """`time_all_reduce` of [rows, dim] on every rank; rank 0's median ms."""
        self._send({"op": "time_all_reduce", "rows": rows, "count": count, "reps": reps})
        return time_all_reduce(rows, self.model.args.dim, count, reps, self.device, self.model.kv.dtype)


def join_group(spec: FollowerSpec, rank: int, store: dist.TCPStore) -> None:
    """Join the process group and run one all-reduce, so that NCCL sets up its communicator now and
    never inside a CUDA graph capture."""
    device = rank_device(spec.device, rank)
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world)
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    if int(probe.item()) != spec.world:
        raise AheadError(f"the tensor-parallel group is broken: an all-reduce of ones gave {probe.item()}")


# -- ranks 1.. ------------------------------------------------------------------------------------------
def build_shard(spec: FollowerSpec, rank: int) -> Runner:
    from .loading import build_model, load_checkpoint, release_weights

    device = rank_device(spec.device, rank)
    dtype = getattr(torch, spec.dtype)
    shard = Shard(rank, spec.world)
    if spec.random is not None:
        model = random_model(ModelArgs(**spec.random), spec.max_seq_len, shard, device, dtype)
    else:
        ckpt = load_checkpoint(spec.source, log=lambda _: None, dtype=dtype)
        model = build_model(ckpt, device, dtype, spec.max_seq_len, shard)
        release_weights(ckpt)
    return Runner(model, use_graphs=spec.use_graphs)


class Follower:
    """A rank above 0: makes rank 0's model calls on its own shard, in the order rank 0 made them."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.shapes: dict[str, StepShape] = {}
        self.parked: dict[int, Tensor] = {}  # rank 0's handle -> this shard's parked K/V

    def follow(self, channel: IO[bytes]) -> None:
        """Until rank 0 closes the channel."""
        for message in msgpack.Unpacker(channel, max_buffer_size=1 << 30):
            self.handle(message)

    def handle(self, message: dict) -> None:
        runner, op = self.runner, message["op"]
        if op == "step":
            runner.step(self.shapes[message["shape"]], message["tokens"], message["base"], message["graph"])
        elif op == "layout":
            name, T = message["name"], len(message["rel_pos"])
            rel_pos = torch.tensor(message["rel_pos"])
            local = torch.frombuffer(bytearray(message["local"]), dtype=torch.bool).view(T, T)
            if name not in self.shapes:
                self.shapes[name] = StepShape(name, rel_pos, local, message["logits"], message["moves"],
                                              message["causal"])
            else:  # new positions and mask for the same shape
                runner.set_layout(self.shapes[name], rel_pos, local)
        elif op == "move":
            runner.move_slots(message["src"], message["dst"])
        elif op == "save":
            self.parked[message["id"]] = runner.save(message["n"])
        elif op == "restore":
            runner.restore(self.parked[message["id"]])
        elif op == "drop":
            for handle in message["ids"]:
                self.parked.pop(handle, None)
        elif op == "time_all_reduce":
            time_all_reduce(message["rows"], runner.model.args.dim, message["count"], message["reps"],
                            runner.device, runner.model.kv.dtype)
        else:
            raise ValueError(f"unknown tensor-parallel message {op!r}")


def leave_group() -> None:
    """Tear the process group down, except NCCL's: CUDA graphs that captured its collectives keep the
    communicator in use, and tearing it down blocked: on 2 H200s `ahead engine --tp 2` did not exit within
    30 s of a SIGTERM; without the teardown it stops, follower included. The process is about to exit anyway."""
    if dist.is_initialized() and dist.get_backend() != "nccl":
        dist.destroy_process_group()


def exit_with_parent() -> None:
    """Leave when rank 0 dies, even inside a collective that would otherwise wait for it forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="ahead-tp-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    rank, spec = int(argv[0]), FollowerSpec(**json.loads(argv[1]))
    ready = os.fdopen(os.dup(1), "wb")  # stdout is rank 0's "ready" channel; anything printed goes to stderr
    os.dup2(2, 1)
    exit_with_parent()
    torch.set_num_threads(spec.threads)
    if spec.device == "cuda":
        torch.cuda.set_device(rank)
    try:
        runner = build_shard(spec, rank)
    except AheadError as exc:
        print(f"ahead: error: tensor-parallel rank {rank}: {exc}", file=sys.stderr)
        return 2
    ready.write(READY)
    ready.close()
    store = dist.TCPStore("127.0.0.1", spec.port, spec.world, is_master=False, timeout=JOIN_TIMEOUT)
    join_group(spec, rank, store)
    with open(0, "rb", buffering=0, closefd=False) as channel:
        Follower(runner).follow(channel)
    leave_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
