"""Where a run starts, decided once for all ranks.

Rank 0 alone chooses the checkpoint the run starts from (or none), by these rules:

- **Evaluation** (--eval, --test): an explicit --resume; else, with --auto_resume, the newest
  readable checkpoint of the run in --output_dir; else none, and main.py stops (it never evaluates
  an untrained model).
- **Training**: with --auto_resume, the newest readable checkpoint of the run (a restarted or requeued
  job continues); a truncated or corrupt one is named in a warning and the next newest is used.
  --resume (or --finetune, which loads only the weights, util/finetune.py) only starts a run, except when it names one of the run's own older checkpoints: then the
  run *rewinds* to it, once (recorded in attempts.jsonl), and the newer checkpoints are moved to
  output_dir/set_aside/attempt<N>/ (with log.txt's lines of the epochs to be trained again), so that
  a later restart continues the rewound run instead of the abandoned one. Without --auto_resume,
  --resume.
- A training start from the same point as the two attempts before it (same checkpoint state and
  batch plan), both ended without a newer checkpoint, stops instead (--max_repeated_failures).

Every rank then loads that checkpoint: from the same path when it can read it there and it holds the
same weights, else from rank 0 over the process group. An --output_dir that is a different folder on
each node (node-local disks) therefore works: rank 0's folder holds the run. After the weights are
in the model, the ranks compare what they hold (file, epoch, step and a checksum of the weights) and
stop naming any rank that differs.
"""
from __future__ import annotations

import os
import shutil
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

import util.misc as utils
from models.weights import is_class_head
from util import attempts
from util.checkpoint import CorruptCheckpointError, load_checkpoint
from util.resume import batch_plan

LATEST = "checkpoint.pth"
SET_ASIDE = "set_aside"
FOLDER_MARK = ".rank0_folder"  # rank 0 writes a token here; a rank that cannot read it has another folder
DEFAULT_MAX_REPEATED_FAILURES = 2


@dataclass
class Start:
    """What rank 0 decided, as every rank receives it."""
    path: str = ""  # the checkpoint to load ("" for none)
    why: str = ""
    epoch: int = 0
    step: int = 0
    checksum: str = ""  # of the checkpoint's weights, as rank 0 read them
    own: bool = False  # the checkpoint is one of this run's (in --output_dir)
    attempt: int = 0  # this attempt's number in attempts.jsonl (0: none recorded)
    folder_token: str = ""
    stop: str = ""  # the run must not go on: the reason
    looked_in: str = ""  # where --auto_resume looked, for the message when nothing was found
    finetune: bool = False  # the checkpoint starts a new run (--finetune): weights only, heads afresh
    notes: List[str] = field(default_factory=list)  # printed by rank 0


def weights_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """A CRC-32 of every tensor's name and bytes, in name order (values on any device)."""
    crc = 0
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"", crc)
    return f"{crc:08x}"


def own_checkpoints(output_dir: Path) -> List[Path]:
    """The run's checkpoints in output_dir, newest first: checkpoint.pth (rewritten at every save),
    then the numbered epoch checkpoints from the last epoch down."""
    numbered = sorted(output_dir.glob("checkpoint[0-9][0-9][0-9][0-9].pth"), reverse=True)
    latest = output_dir / LATEST
    return ([latest] if latest.exists() else []) + numbered


def is_own(path: str, output_dir: Optional[Path]) -> bool:
    """Whether `path` is one of the run's checkpoints in output_dir."""
    if output_dir is None or not path or "://" in path:
        return False
    return Path(path).resolve().parent == output_dir.resolve() and Path(path).name.startswith("checkpoint")


def _newest_readable(output_dir: Path) -> Tuple[Optional[Path], Optional[dict]]:
    for candidate in own_checkpoints(output_dir):
        try:
            return candidate, load_checkpoint(candidate, map_location="cpu")
        except CorruptCheckpointError as error:
            warnings.warn(f"--auto_resume: {candidate} cannot be read ({error}); trying the run's next newest "
                          f"checkpoint")
    return None, None


def _epoch_of(path: Path, ckpt: Optional[Mapping[str, Any]] = None) -> Tuple[int, int]:
    """(epoch, step) a checkpoint of the run holds: from its contents, or its number in the name."""
    if ckpt is not None and "epoch" in ckpt:
        return int(ckpt["epoch"]), int(ckpt.get("step", 0))
    digits = path.stem.removeprefix("checkpoint")
    return (int(digits), 0) if digits.isdigit() else (-1, 0)


def set_aside_newer(output_dir: Path, target: Path, target_ckpt: Mapping[str, Any], attempt: int) -> List[str]:
    """Moves the run's checkpoints newer than `target` (and log.txt's lines of the epochs after it)
    to output_dir/set_aside/attempt<N>/; -> the names moved. Nothing is deleted."""
    epoch, step = _epoch_of(target, target_ckpt)
    folder = output_dir / SET_ASIDE / f"attempt{attempt}"
    moved = []
    for path in own_checkpoints(output_dir):
        if path.resolve() == target.resolve():
            continue
        ckpt = None
        if path.name == LATEST:
            try:
                ckpt = load_checkpoint(path, map_location="cpu")
            except CorruptCheckpointError:
                ckpt = {"epoch": 1 << 30}  # unreadable: newer than anything it could be rewound to
        if _epoch_of(path, ckpt) > (epoch, step):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(folder / path.name))
            moved.append(path.name)
    log = output_dir / "log.txt"
    if log.exists():
        import json
        lines = log.read_text().splitlines(keepends=True)
        later = [line for line in lines if line.strip() and json.loads(line).get("epoch", -1) >= epoch + (step == 0)]
        if later:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "log.txt").write_text("".join(later))
            log.write_text("".join(line for line in lines if line not in later))
            moved.append(f"log.txt ({len(later)} lines)")
    return moved


def _choose(args, output_dir: Optional[Path], events: List[dict], attempt: int) -> Tuple[str, str, Optional[dict], List[str]]:
    """Rank 0: (path, why, checkpoint, notes) by the module's rules; ("", "", None, notes) for none."""
    notes: List[str] = []
    explicit = args.resume
    own = output_dir / LATEST if output_dir is not None else None
    started = args.auto_resume and own is not None and bool(own_checkpoints(output_dir))
    if args.eval and explicit:
        why = "--resume" + (" (given explicitly, it wins over --auto_resume)" if started else "")
        return explicit, why, load_checkpoint(explicit, map_location="cpu"), notes
    finetune = getattr(args, "finetune", "") if not args.eval else ""
    if finetune and not started:
        return finetune, "--finetune: a new run starts from this detector", load_checkpoint(finetune), notes
    if started:
        if explicit and not args.eval and is_own(explicit, output_dir) and Path(explicit).name != LATEST:
            done = attempts.rewound_to(events, Path(explicit).name)
            if done is None:
                ckpt = load_checkpoint(explicit, map_location="cpu")
                moved = set_aside_newer(output_dir, Path(explicit), ckpt, attempt)
                notes.append(f"Rewinding the run to {explicit}: moved {', '.join(moved) or 'nothing'} to "
                             f"{output_dir / SET_ASIDE / f'attempt{attempt}'}")
                return explicit, "--resume of one of the run's own checkpoints: the run rewinds to it", ckpt, notes
            notes.append(f"--resume {explicit}: attempt {done} already rewound the run to it; continuing from the "
                         f"run's newest checkpoint (leave --resume out, or rewind to another checkpoint)")
        path, ckpt = _newest_readable(output_dir)
        if path is not None:
            why = "--auto_resume: the newest checkpoint of this run, in --output_dir"
            if path != own:
                why = "--auto_resume: the newest readable checkpoint of this run, in --output_dir"
            if explicit and not args.eval and not is_own(explicit, output_dir):
                why += f"; --resume {explicit} only starts a run, and this one has started"
            if finetune:
                why += f"; --finetune {finetune} only starts a run, and this one has started"
            return str(path), why, ckpt, notes
        warnings.warn(f"--auto_resume: no checkpoint in {output_dir} can be read; starting the run "
                      + (f"from --resume {explicit}" if explicit and not args.eval else "afresh"))
    if explicit:
        return explicit, "--resume", load_checkpoint(explicit, map_location="cpu"), notes
    return "", "", None, notes


def _broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if utils.get_world_size() == 1:
        return obj
    box = [obj if utils.is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _repeat_stop(args, events: List[dict], point: attempts.StartPoint, path: str, output_dir: Path) -> str:
    """The message that stops a start which would repeat a failure, or ""."""
    limit = getattr(args, "max_repeated_failures", DEFAULT_MAX_REPEATED_FAILURES)
    repeated = attempts.repeated_failures(events, point)
    if not limit or len(repeated) < limit:
        return ""
    older = [p.name for p in own_checkpoints(output_dir) if p.name != LATEST][:3]
    where = f"epoch {point.epoch} after step {point.step} ({path})" if point.epoch >= 0 else "the run's start"
    return (f"this run failed {len(repeated)} times in a row starting from the same point, {where}, before "
            f"writing a newer checkpoint: {attempts.describe_failures(repeated)}. "
            f"Another restart would replay the same batches, so the run stops here (its record: "
            f"{output_dir / attempts.ATTEMPTS_FILE}). Ways out: continue from an older checkpoint of the run with "
            f"--resume {output_dir / (older[0] if older else 'checkpointNNNN.pth')} (the run rewinds to it once; "
            f"newer checkpoints are moved to {output_dir / SET_ASIDE}/, nothing is deleted); or continue this "
            f"checkpoint with another --batch_size (the rest of the epoch is regrouped); or, for a failure that will "
            f"not come back, allow more attempts with --max_repeated_failures {len(repeated) + 1}.")


def decide(args) -> Tuple[Start, Optional[dict]]:
    """Every rank: rank 0's decision and the chosen checkpoint (None for a fresh start), loaded on
    this rank (see the module docstring). Training starts are recorded in attempts.jsonl."""
    output_dir = Path(args.output_dir) if args.output_dir else None
    start, ckpt = Start(), None
    if utils.is_main_process():
        try:
            start, ckpt = _decide_on_rank0(args, output_dir)
        except (Exception, SystemExit) as error:  # every rank must hear of it, rather than wait for rank 0
            if utils.get_world_size() == 1:
                raise
            start = Start(stop=error.code if isinstance(error, SystemExit) and isinstance(error.code, str) else
                          f"rank 0 could not choose the checkpoint to start from: {type(error).__name__}: {error}")
    start = _broadcast(start)
    for note in start.notes:
        print(note)
    if start.stop:
        raise SystemExit(start.stop)
    if start.path:
        print(f"{'Starting' if start.finetune else 'Resuming'} from {start.path} ({start.why})")
    ckpt = _same_checkpoint_everywhere(args, start, ckpt)
    return start, ckpt


def _decide_on_rank0(args, output_dir: Optional[Path]) -> Tuple[Start, Optional[dict]]:
    """decide()'s work on rank 0: the checkpoint, loaded, and (training) the attempt recorded."""
    events = attempts.read(output_dir) if output_dir is not None and output_dir.is_dir() else []
    attempt = attempts.next_attempt(events)
    path, why, ckpt, notes = _choose(args, output_dir, events, attempt)
    start = Start(path=path, why=why, notes=notes, own=is_own(path, output_dir),
                  looked_in=str(output_dir) if args.auto_resume and output_dir is not None else "")
    start.finetune = bool(path) and path == getattr(args, "finetune", "") and not start.own
    if ckpt is not None:
        if "model" not in ckpt:
            raise SystemExit(f"{path} has no 'model' entry; keys: {sorted(ckpt)}")
        start.epoch, start.step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
        start.checksum = weights_checksum(ckpt["model"])
    if output_dir is None or not output_dir.is_dir():
        return start, ckpt
    start.folder_token = os.urandom(8).hex()
    (output_dir / FOLDER_MARK).write_text(start.folder_token)
    if args.eval:
        return start, ckpt
    start.attempt = attempt
    resumed = ckpt is not None and not start.finetune and all(k in ckpt for k in ("optimizer", "lr_scheduler", "epoch"))
    point = (attempts.StartPoint(start.epoch, start.step, int(ckpt.get("global_step") or 0), batch_plan(args))
             if resumed else attempts.StartPoint(-1, 0, 0, batch_plan(args)))  # a start from scratch
    start.stop = _repeat_stop(args, events, point, path, output_dir)
    if start.stop:
        attempts.append(output_dir, {"attempt": attempt, "stopped": "repeated failures"})
    else:
        source = Path(path).name if start.own else path
        attempts.append(output_dir, attempts.start_event(attempt, point, source, source if "rewinds" in why else None))
    return start, ckpt


def _same_checkpoint_everywhere(args, start: Start, ckpt: Optional[dict]) -> Optional[dict]:
    """Every rank holds rank 0's checkpoint: read from start.path where it holds the same weights,
    else received from rank 0. Also says when --output_dir is not one folder for all ranks."""
    if utils.get_world_size() == 1:
        return ckpt
    sees_folder = not start.folder_token or _reads_token(args.output_dir, start.folder_token)
    has = True
    if start.path and not utils.is_main_process():
        ckpt = None
        try:
            ckpt = load_checkpoint(start.path, map_location="cpu")
            has = weights_checksum(ckpt["model"]) == start.checksum
        except (OSError, RuntimeError, KeyError):
            has = False  # not on this node, unreadable here, or another file under that name
    own = bool(args.output_dir) and bool(own_checkpoints(Path(args.output_dir)))
    status = utils.all_gather((sees_folder, has, own))
    apart = [rank for rank, (sees, _, _) in enumerate(status) if not sees]
    holding = [rank for rank, (_, _, own) in enumerate(status) if own]
    if args.auto_resume and not start.path and apart and holding:
        raise SystemExit(f"rank 0 found no checkpoint in --output_dir {args.output_dir}, but ranks {holding} have "
                         f"checkpoints in theirs, a folder of their node's own: rank 0 now runs on another node than "
                         f"the one that wrote them. Start rank 0 on that node (static rendezvous: NODE_RANK 0), or "
                         f"copy the run's folder to rank 0's node, or use a folder that the nodes share.")
    if apart:
        print(f"--output_dir {args.output_dir} is not the same folder on every node (ranks {apart} do not see rank "
              f"0's files): rank 0's folder holds the run's checkpoints and logs, and the other ranks receive the "
              f"checkpoint from rank 0 when the run resumes. A restarted job must run rank 0 where that folder is; "
              f"a folder shared by the nodes avoids the constraint.")
    if all(ok for _, ok, _ in status):
        return ckpt
    missing = [rank for rank, (_, ok, _) in enumerate(status) if not ok]
    print(f"ranks {missing} cannot read {start.path} as rank 0 did: sending rank 0's copy")
    received = _broadcast(ckpt if utils.is_main_process() else None)
    return ckpt if status[utils.get_rank()][1] else received


def _reads_token(output_dir: str, token: str) -> bool:
    try:
        return (Path(output_dir) / FOLDER_MARK).read_text() == token
    except OSError:
        return False


def verify_same_state(model: torch.nn.Module, start: Start) -> None:
    """After loading: every rank holds the same file, epoch, step and weights, or the run stops
    naming the ranks that differ from rank 0. A fine-tuning start's new class heads are left out:
    each rank draws its own, and DDP gives every rank rank 0's when it wraps the model."""
    state = {k: v for k, v in model.state_dict().items() if not (start.finetune and is_class_head(k))}
    mine = (start.path, start.epoch, start.step, weights_checksum(state))
    everyone = utils.all_gather(mine)
    differ = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differ:
        described = "; ".join(f"rank {rank}: {everyone[rank]}" for rank in [0] + differ)
        raise SystemExit(f"the ranks did not load the same state (file, epoch, step, weights checksum): {described}. "
                         f"Check that every node runs the same code and flags.")


def missed_evaluation(args, start: Start, due: Callable[[int], bool]) -> Optional[int]:
    """The epoch whose evaluation the run's last attempt missed (it was killed after the epoch's
    checkpoint and before the epoch's log line), or None; rank 0 decides from log.txt."""
    epoch = None
    if utils.is_main_process() and start.own and start.step == 0 and start.path and due(start.epoch):
        log = Path(args.output_dir) / "log.txt"
        import json
        logged = {json.loads(line).get("epoch") for line in log.read_text().splitlines() if line.strip()} \
            if log.exists() else set()
        epoch = None if start.epoch in logged else start.epoch
    return _broadcast(epoch)


def record(args, start: Start, event: Dict[str, Any]) -> None:
    """Rank 0 appends an event of this attempt to attempts.jsonl (training with --output_dir only)."""
    if start.attempt and utils.is_main_process() and args.output_dir:
        attempts.append(Path(args.output_dir), {"attempt": start.attempt, **event})
