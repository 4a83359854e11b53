"""Batching of images, distributed helpers and training-loop logging."""
import datetime
import os
import subprocess
import sys
import time
from collections import defaultdict, deque
from typing import Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


# --------------------------------------------------------------------------------------
# Images of different sizes in one batch
# --------------------------------------------------------------------------------------
class NestedTensor:
    """A padded batch of images plus the mask of padded pixels.

    tensors: (B, C, H, W); mask: (B, H, W), True on padding.
    """

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def pin_memory(self) -> "NestedTensor":
        """Page-locked copies. DataLoader(pin_memory=True) calls this for batch types of its own,
        so that the uploads with non_blocking=True (engine) do not block the host."""
        mask = None if self.mask is None else self.mask.pin_memory()
        return NestedTensor(self.tensors.pin_memory(), mask)

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={None if self.mask is None else tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list: Sequence[Tensor], size_divisibility: int = 1) -> NestedTensor:
    """Pads a list of (C, H_i, W_i) images at the bottom and right into one NestedTensor of
    (B, C, H, W): H and W are the largest image's, rounded up to a multiple of
    `size_divisibility` (1, the official padding, rounds nothing)."""
    if len(tensor_list) == 0 or any(t.ndim != 3 for t in tensor_list):
        raise ValueError("expected a non-empty list of (C, H, W) image tensors")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    channels = tensor_list[0].shape[0]
    height = round_up(max(t.shape[1] for t in tensor_list), size_divisibility)
    width = round_up(max(t.shape[2] for t in tensor_list), size_divisibility)
    first = tensor_list[0]
    tensors = first.new_zeros((len(tensor_list), channels, height, width))
    mask = torch.ones((len(tensor_list), height, width), dtype=torch.bool, device=first.device)
    for img, padded, m in zip(tensor_list, tensors, mask):
        padded[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensors, mask)


def round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def collate_fn(batch, size_divisibility: int = 1):
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(images, size_divisibility), targets


class NonFiniteLossError(RuntimeError):
    """The model's outputs or its loss became NaN or infinite (a diverged model, or NaN weights).

    Raised before the optimizer step, so no weight changes and no checkpoint is written.
    """


class DeviceWaits:
    """When the host began its current wait for the device (None: not waiting). HostCopy records its
    waits here; util.step_control.HangWatchdog reads it to tell a stuck collective from a slow step."""

    def __init__(self):
        self.since: Optional[float] = None

    def __enter__(self) -> "DeviceWaits":
        self.since = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.since = None


DEVICE_WAITS = DeviceWaits()


class HostCopy:
    """A copy of a device tensor to the host, started now and awaited only in `wait()`.

    On CUDA the copy goes to pinned memory behind the work already queued, so the host keeps
    launching until it needs the values. Every read of device values on the training path goes
    through this class (or `to_host`): each one is a host-device round trip.

    The copy is queued on the current stream of the tensor's own device, and the event that
    `wait()` waits for is recorded on that same stream: recorded on the current device's stream
    instead (another GPU when the process never called set_device), it could fire before the
    copy lands.
    """

    def __init__(self, tensor: Tensor):
        tensor = tensor.detach()
        self._event = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.cpu()

    def wait(self):
        """-> the values as a numpy array."""
        if self._event is not None:
            with DEVICE_WAITS:
                self._event.synchronize()
        return self._host.numpy()


def to_host(tensor: Tensor):
    """Device tensor -> numpy array, waiting for it (one round trip)."""
    return HostCopy(tensor).wait()


def to_device_async(array, device) -> Tensor:
    """numpy array -> tensor on `device`; on CUDA through pinned memory, so the host does not wait."""
    tensor = torch.from_numpy(array)
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def unbind(x: Tensor, dim: int = 0) -> List[Tensor]:
    """x.unbind(dim) whose backward is one concatenation (unbind's is one copy per piece)."""
    return [t.squeeze(dim) for t in x.split(1, dim)]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit with the input clamped to [eps, 1 - eps], as DETR-family models use it."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


@torch.no_grad()
def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Top-1 accuracy in percent of (N, K) logits against (N,) labels; 0 for an empty batch."""
    if target.numel() == 0:
        return torch.zeros([], device=output.device)
    return (output.argmax(-1) == target).float().mean() * 100.0


# --------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------
DEFAULT_DIST_TIMEOUT_MINUTES = 10.0  # as NCCL's watchdog: a collective stuck this long fails


def dist_timeout(args) -> datetime.timedelta:
    """How long a collective may wait for its peers (--dist_timeout, in minutes)."""
    return datetime.timedelta(minutes=getattr(args, "dist_timeout", None) or DEFAULT_DIST_TIMEOUT_MINUTES)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather(data) -> List:
    """Gathers any picklable object from every rank (works with gloo and NCCL)."""
    world_size = get_world_size()
    if world_size == 1:
        return [data]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, data)
    return gathered


def gather_to_main(data) -> List:
    """Every rank's picklable `data`, on rank 0 only (an empty list elsewhere): what only rank 0
    writes need not reach, nor be held by, the others."""
    world_size = get_world_size()
    if world_size == 1:
        return [data]
    gathered = [None] * world_size if is_main_process() else None
    dist.gather_object(data, gathered, dst=0)
    return gathered if is_main_process() else []


def _slurm_master_addr(node_list: str) -> str:
    """First host of a slurm node list such as 'gpu[01-04],gpu07'."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", node_list],
                             capture_output=True, text=True, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    # without scontrol: expand the first entry by hand
    first = node_list.split(",")[0]
    if "[" in first:
        prefix, rng = first.split("[", 1)
        start = rng.rstrip("]").split(",")[0].split("-")[0]
        return prefix + start
    return first


def slurm_step_tasks(env) -> int:
    """Processes that slurm started for this process's job step; 1 outside a step.

    srun sets SLURM_STEP_NUM_TASKS for every task it starts. A batch script (sbatch) or an
    salloc shell sees only the job's SLURM_NTASKS: a `python main.py` there is one process,
    whatever the job's task count, and waiting for the others would hang forever.
    """
    job_tasks = int(env.get("SLURM_NTASKS", "1"))
    if "SLURM_STEP_NUM_TASKS" in env:
        return int(env["SLURM_STEP_NUM_TASKS"])
    if job_tasks > 1:
        print(f"warning: slurm gives this job {job_tasks} tasks, but this process was not started by srun "
              f"(SLURM_STEP_NUM_TASKS is not set): running as ONE process. Start the {job_tasks} processes "
              f"with `srun python main.py ...` (scripts_slurm/launch.sh does).", flush=True)
    return 1


def set_single_device(args) -> None:
    """One process on one GPU: make --device the current CUDA device, so that streams, events
    and kernels without an explicit device (torch's defaults) go to it, not to GPU 0."""
    device = torch.device(args.device)
    if device.type != "cuda" or device.index is None:
        return
    count = torch.cuda.device_count()
    if device.index >= count:
        raise SystemExit(f"--device {args.device}: only {count} CUDA device(s) are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    torch.cuda.set_device(device)
    args.gpu = device.index


# The keys of the generation handshake (see generation_store), under a prefix of the project's own.
_GENERATION_KEY = "sam-detr/generation"
_GENERATION_POLL_S = 0.01


def generation_store(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """`store` seen through a prefix that is new for every start of the process group, agreed by
    all ranks; the default group is built on it.

    A rendezvous store can outlive the processes that used it: torchrun keeps its store across
    `--max-restarts` restarts (static rendezvous, and the c10d rendezvous that shares its store with
    the workers), so a restarted group would read its dead predecessors' addresses (gloo) or NCCL ids
    there and wait on them forever. A prefix from TORCHELASTIC_RESTART_COUNT does not help: that
    count is each node's own, and a node whose workers torchrun stops because another node failed
    does not count a restart.

    So rank 0 takes the next number from a counter in the store and answers each other rank, which
    asks with a nonce of its own (a stale question of a dead process may be answered too: nobody
    reads that answer), until every rank has confirmed the number under that new generation's key.
    """
    if world_size == 1:
        return store
    if rank == 0:
        generation = store.add(_GENERATION_KEY, 1)
        joined, answered, deadline = f"{_GENERATION_KEY}/{generation}/joined", set(), time.monotonic() + timeout.total_seconds()
        while store.add(joined, 0) < world_size - 1:
            for other in range(1, world_size):
                question = f"{_GENERATION_KEY}/question/{other}"
                if store.check([question]):
                    nonce = store.get(question).decode()
                    if nonce not in answered:
                        store.set(f"{_GENERATION_KEY}/answer/{nonce}", str(generation))
                        answered.add(nonce)
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0: not every rank joined the process group within --dist_timeout "
                                   f"({store.add(joined, 0)} of the other {world_size - 1} did)")
            time.sleep(_GENERATION_POLL_S)
    else:
        nonce = os.urandom(16).hex()
        store.set(f"{_GENERATION_KEY}/question/{rank}", nonce)
        generation = int(store.get(f"{_GENERATION_KEY}/answer/{nonce}"))  # waits up to the store's time-out
        store.add(f"{_GENERATION_KEY}/{generation}/joined", 1)
    return dist.PrefixStore(f"{_GENERATION_KEY}/{generation}/group", store)


# slurm steps on the same node that share a MASTER_PORT would meet in one store: each job takes a
# port of its own from its id, below the kernel's ephemeral range (32768 and up)
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


def slurm_master_port(env) -> str:
    """MASTER_PORT, else a port derived from SLURM_JOB_ID (29686, the official one, outside a job)."""
    if env.get("MASTER_PORT"):
        return env["MASTER_PORT"]
    job = env.get("SLURM_JOB_ID", "")
    return str(SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN) if job.isdigit() else "29686"


def slurm_local_device(env, rank: int, device_count: int) -> int:
    """The GPU of a slurm task: its SLURM_LOCALID among the GPUs it sees. Where slurm gives each task
    one GPU of its own (--gpus-per-task, --gpu-bind), the task sees one device, index 0."""
    local = int(env.get("SLURM_LOCALID", rank))
    return local % max(device_count, 1)


def init_distributed_mode(args) -> None:
    """Sets up torch.distributed from torchrun (env://) or slurm variables (srun).

    Sets args.distributed, args.rank, args.world_size, args.gpu and args.dist_backend:
    NCCL when the device is CUDA, gloo otherwise. A single CUDA process gets --device as its
    current device. With env:// the group is built on a store prefix new to this start of the
    group (generation_store), so that restarts under any rendezvous meet their live peers only.
    """
    env = os.environ
    torchrun = "RANK" in env and "WORLD_SIZE" in env
    step_tasks = slurm_step_tasks(env) if "SLURM_PROCID" in env and not torchrun else 1
    if torchrun:
        args.rank = int(env["RANK"])
        args.world_size = int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", 0))
    elif step_tasks > 1:
        args.rank = int(env["SLURM_PROCID"])
        args.world_size = step_tasks
        args.gpu = slurm_local_device(env, args.rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        env.setdefault("MASTER_ADDR", _slurm_master_addr(env.get("SLURM_STEP_NODELIST", env.get(
            "SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))))
        env["MASTER_PORT"] = slurm_master_port(env)
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(args.rank), str(args.world_size), str(args.gpu)
        args.dist_url = "env://"
    else:
        args.distributed = False
        args.rank, args.gpu, args.world_size = 0, 0, 1
        set_single_device(args)
        return

    args.distributed = True
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    print(f"| distributed init (rank {args.rank}/{args.world_size}, {args.dist_backend}): {args.dist_url}", flush=True)
    from util.step_control import process_group_timeout  # (it imports this module)
    timeout = process_group_timeout(args.dist_backend, dist_timeout(args))
    where = dict(init_method=args.dist_url)
    if args.dist_url == "env://":
        store, _, _ = next(dist.rendezvous(args.dist_url, args.rank, args.world_size, timeout=timeout))
        where = dict(store=generation_store(store, args.rank, args.world_size, timeout))
    dist.init_process_group(backend=args.dist_backend, world_size=args.world_size, rank=args.rank,
                            device_id=torch.device(args.device) if use_cuda else None,
                            timeout=timeout, **where)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def setup_for_distributed(is_master: bool) -> None:
    """Silences print() on every rank but the first (print(..., force=True) still prints)."""
    import builtins
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------
class SmoothedValue:
    """Tracks a series of values: a windowed median/average and the global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sums count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Collects SmoothedValues and prints progress lines with an ETA every `print_freq` steps.

    On an interactive terminal with `progress_bar=True` a tqdm bar replaces the lines; logs
    redirected to a file keep the plain DETR format that existing log parsers expect.
    """

    def __init__(self, delimiter: str = "  ", progress_bar: bool = False):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.progress_bar = progress_bar and sys.stdout.isatty() and is_main_process()

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def __getattr__(self, attr):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        total = len(iterable)
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        bar = None
        if self.progress_bar:
            from tqdm import tqdm
            bar = tqdm(total=total, desc=header, dynamic_ncols=True)
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if bar is not None:
                bar.update(1)
                if i % max(print_freq // 10, 1) == 0:
                    bar.set_postfix_str(str(self), refresh=False)
            elif i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                parts = [header, f"[{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}")
                print(self.delimiter.join(parts), flush=True)
            end = time.time()
        if bar is not None:
            bar.close()
        total_time = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(total, 1):.4f} s / it)", flush=True)
