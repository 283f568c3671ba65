"""Pre-train step 05's GPT with its training state sharded across the ranks (ZeRO-1, FSDP2).

    python 05_gpt_ddp/prepare.py --tokenizer char            # once: writes 05_gpt_ddp/data/
    torchrun --standalone --nproc_per_node=4 08_fsdp/train.py --preset tiny --stage zero3
    torchrun --standalone --nproc_per_node=4 08_fsdp/train.py --preset gpt-1.4b --resume

Step 05's loop; --stage says how much each rank keeps (parallelize.py): ddp everything, zero1
AdamW states sharded, zero2 gradients too, zero3 parameters too. Every rank samples its own
random windows of the token file; the windows of optimizer step s on rank r depend only on
(seed, r, s). Every rank writes its shard of each checkpoint (checkpoint.py); rank 0 logs.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import checkpoint
import cluster
import memory
import numpy as np
import parallelize
import report
import torch
import torch.distributed as dist
from model import GPT, PRESETS, config_for, flops_per_token, num_params

HERE = Path(__file__).resolve().parent
PROG = "train.py"

# independent random streams, so that e.g. evaluating more often never changes the training batches
TRAIN_STREAM, VAL_STREAM, DROPOUT_STREAM = 0, 1, 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model size (model.py)")
    p.add_argument("--stage", choices=parallelize.STAGES, default="zero3", help="what to shard")
    p.add_argument(
        "--data_dir", type=Path, default=HERE.parent / "05_gpt_ddp" / "data", help="prepare.py's"
    )
    p.add_argument("--out_dir", type=Path, default=HERE / "out", help="checkpoint, metrics, plots")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="auto: bf16 on CUDA only; fp16 (with loss scaling): for GPUs without bf16",
    )
    p.add_argument("--batch_size", type=int, default=16, help="sequences per micro-batch per rank")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    sync_help = "reduce-scatter after each micro-batch: more traffic, no unsharded gradients kept"
    p.add_argument("--sync_every_micro_batch", action="store_true", help=sync_help)
    p.add_argument("--max_steps", type=int, default=1000, help="optimizer steps in total")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--scale_lr", action="store_true", help="multiply --lr by the world size")
    p.add_argument("--warmup_steps", type=int, default=100, help="linear LR warm-up")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW, matrices only")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm; 0: none")
    p.add_argument("--eval_every", type=int, default=100, help="validate every N steps")
    p.add_argument("--eval_batches", type=int, default=20, help="validation batches per rank")
    p.add_argument("--sample_every", type=int, default=500, help="0: never print samples")
    p.add_argument("--save_every", type=int, help="checkpoint every N steps; unset: --eval_every")
    p.add_argument("--log_every", type=int, default=10, help="print every N steps")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt-* if any")
    p.add_argument(
        "--timeout", type=float, default=600, help="seconds a collective waits for all ranks"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--activation_checkpointing", action="store_true", help="less memory, +1/3 time")
    p.add_argument("--peak_flops", type=float, help="device FLOP/s for MFU (unset: table/measured)")
    p.add_argument("--seed", type=int, default=1337, help="weights, batches, dropout")
    p.add_argument("--tensorboard", action="store_true", help="metrics also as TensorBoard events")
    p.add_argument("--plan", metavar="GPU", help='print the memory plan for "H100 80GB", "24GB"...')
    p.add_argument("--plan_world_size", type=int, default=8, help="ranks that --plan assumes")
    args = p.parse_args(argv)
    if args.save_every is None:  # a checkpoint at every evaluation, best.pt among them
        args.save_every = args.eval_every
    positive = ["batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches"]
    for name in positive + ["save_every", "log_every", "plan_world_size"]:
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.lr <= 0 or min(args.warmup_steps, args.sample_every, args.seed, args.grad_clip) < 0:
        p.error("--lr must be positive; --warmup_steps, --sample_every, --seed, --grad_clip >= 0")
    if args.tensorboard and report.tensorboard_missing():
        p.error(report.tensorboard_missing())
    if args.dtype == "fp16" and args.stage in parallelize.SHARDED:
        p.exit(2, f"{PROG}: error: {parallelize.NO_FP16}\n")  # one line: not a typo of a flag
    if args.plan and args.dtype == "auto":  # a plan for a GPU, made on any machine
        args.dtype = "bf16"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        causes = cluster.no_gpu_causes()
        p.error(f"--device cuda, but PyTorch sees no GPU: {causes}; or use --device cpu")
    if args.dtype == "auto":
        # fp32 on CPU: exact and alike on every CPU. bf16 matmuls are fast only on CPUs with
        # bf16 instructions (AVX512-BF16, AMX); elsewhere autocast is many times slower.
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def fail(message):
    sys.exit(f"{PROG}: error: {message}")


def rng(*keys):
    """A numpy generator that is a pure function of its integer keys."""
    return np.random.default_rng(list(keys))


def load_split(data_dir, split, block_size, meta):
    """The token file as a memmap, checked against meta.json without reading it: its cost does not
    grow with the corpus (a scan of every id, on every rank, would)."""
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        fail(f"{path} not found; run prepare.py --data_dir {data_dir} first")
    if path.stat().st_size % 2:
        fail(f"{path} has an odd size, but holds 2-byte (uint16) token ids; run prepare.py again")
    n_tokens = path.stat().st_size // 2
    if n_tokens < block_size + 2:
        fail(
            f"{path} holds {n_tokens} tokens, fewer than one block of {block_size + 1}; "
            "prepare more text or choose a preset with a smaller block_size"
        )
    if n_tokens != meta[f"{split}_tokens"]:  # a copy cut short, or a file of another run
        fail(
            f"{path} holds {n_tokens} tokens, meta.json says {meta[f'{split}_tokens']}; "
            "run prepare.py again"
        )
    vocab_size = meta["vocab_size"]
    if meta["max_id"] >= vocab_size:  # prepare.py counted the ids: no need to read them here
        fail(f"{path} has ids past meta.json's vocabulary of {vocab_size}; run prepare.py again")
    # a memmap reads only the windows we index, so the file may be larger than RAM
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_meta(data_dir):
    path = data_dir / "meta.json"
    if not path.is_file():
        fail(f"{path} not found; run prepare.py --data_dir {data_dir} first")
    meta = json.loads(path.read_text())
    if meta.get("format") != 2:  # 2: with the token counts and max id that load_split checks
        fail(f"{path} is from an older prepare.py; run prepare.py --data_dir {data_dir} again")
    return meta


def get_batch(tokens, batch_size, block_size, device, *keys, vocab_size=None):
    """batch_size random windows of block_size + 1 tokens; inputs and next-token targets."""
    starts = rng(*keys).integers(0, len(tokens) - block_size - 1, size=batch_size)
    windows = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    # a few thousand ids, checked on the CPU: an id past the embedding would be a device-side
    # assert on CUDA. Start-up trusts meta.json; this catches files changed since.
    if vocab_size is not None and windows.max() >= vocab_size:
        fail(
            f"token id {windows.max()} in a batch is past the model's vocabulary of {vocab_size}: "
            "the token files changed after prepare.py wrote them; run prepare.py again"
        )
    batch = torch.from_numpy(windows)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def lr_at(step, args, max_lr):
    """Linear warm-up, then cosine decay to max_lr / 10 at max_steps."""
    if step < args.warmup_steps:
        return max_lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return max_lr / 10 + (max_lr - max_lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay, device, stage):
    # weight decay on matrices only: decaying biases and LayerNorm gains towards 0 only hurts
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one CUDA kernel updates all parameters instead of several per tensor
    optimizer = parallelize.make_optimizer(groups, stage, lr, fused=device.type == "cuda")
    error = parallelize.check_optimizer_holds_shards(optimizer, stage)
    if error:
        fail(error)
    return optimizer


def forward_backward(model, micro_batches, autocast, scaler=None, sync_every=False):
    """Sum the gradients of all micro-batches into .grad; return their mean loss. With an fp16
    GradScaler the gradients are those of the loss times its scale (unscale_ divides it out).

    DDP all-reduces (FSDP reduce-scatters) gradients while backward runs. Without sync they only
    accumulate locally, so all micro-batches but the last skip communication: one reduction per
    optimizer step, whatever --grad_accum is, unless sync_every asks for one per micro-batch.
    """
    n = len(micro_batches)
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        with parallelize.gradient_sync(model, sync=sync_every or i == n - 1):
            with autocast:
                _, loss = model(x, y)
            # each loss is a mean over its micro-batch; dividing by n makes the summed gradient
            # the gradient of the mean over all n micro-batches, as if they were one big batch
            (loss / n if scaler is None else scaler.scale(loss / n)).backward()
        total += loss.detach()
    return total / n


@torch.no_grad()
def evaluate(model, tokens, args, block_size, device, autocast, rank):
    """Mean validation loss over eval_batches fixed batches on every rank, reduced across ranks."""
    model.eval()
    total = torch.zeros(2, device=device)  # sum of batch losses, number of batches
    for i in range(args.eval_batches):
        keys = (args.seed, VAL_STREAM, rank, i)  # the same batches at every evaluation
        x, y = get_batch(
            tokens, args.batch_size, block_size, device, *keys, vocab_size=model.cfg.vocab_size
        )
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.float(), torch.ones((), device=device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def decode(ids, meta):
    table = [bytes.fromhex(h) for h in meta["token_bytes"]]
    # ids past the real vocabulary (padding to a multiple of 64) have no text
    pieces = [b"\n" if i == meta["separator"] else table[i] for i in ids if i < len(table)]
    return b"".join(pieces).decode("utf-8", errors="replace")


def sample(model, meta, device, autocast, seed, n_tokens=200):
    model.eval()
    start = torch.tensor([[meta["separator"]]], device=device)  # "beginning of a document"
    gen = torch.Generator(device=device).manual_seed(seed)
    with autocast:
        out = model.generate(start, n_tokens, temperature=0.8, top_k=50, generator=gen)
    model.train()
    return decode(out[0, 1:].tolist(), meta)


def load_checkpoint_meta(path, cfg, preset):
    """meta.json of the checkpoint folder `path`, checked against this run's model."""
    meta = checkpoint.read_meta(path)
    if meta["config"] != asdict(cfg):
        fail(
            f"{path} holds a '{meta['preset']}' model (vocabulary {meta['config']['vocab_size']})"
            f", not --preset {preset} with this data (vocabulary {cfg.vocab_size}); "
            f"use --preset {meta['preset']} and the same data, or another --out_dir"
        )
    return meta


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    distributed = "RANK" in os.environ  # started by torchrun
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # before init_process_group, so NCCL uses this GPU
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        # after set_device, so it asks this GPU; emulated bf16 (pre-Ampere) counts as none
        if args.dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            fail("this GPU has no bf16 support (pre-Ampere); use --dtype fp16 or --dtype fp32")
    else:
        device = torch.device("cpu")

    if args.plan:  # for a GPU, on any machine: GPT-2's vocabulary padded, no data, no group
        cfg = config_for(args.preset, vocab_size=50304)
        return memory.print_plan(args, cfg)
    # everything that can fail on bad input is checked before the process group exists
    meta = load_meta(args.data_dir)
    # pad the vocabulary to a multiple of 64: matmul kernels prefer round shapes
    cfg = config_for(args.preset, vocab_size=(meta["vocab_size"] + 63) // 64 * 64)
    train_tokens = load_split(args.data_dir, "train", cfg.block_size, meta)
    val_tokens = load_split(args.data_dir, "val", cfg.block_size, meta)
    if args.stage != "ddp" and not distributed:
        fail(
            f"--stage {args.stage} shards the training state across processes: start it with "
            "torchrun (torchrun --nproc_per_node=1 for one), or use --stage ddp"
        )
    found = checkpoint.checkpoints(args.out_dir)
    ckpt_path = found[-1] if found else None  # the latest complete one
    ckpt = None
    if ckpt_path:
        if not args.resume:
            fail(f"{ckpt_path} exists; pass --resume to continue it, or choose another --out_dir")
        ckpt = load_checkpoint_meta(ckpt_path, cfg, args.preset)

    if distributed:
        cluster.init_process_group(device, args.timeout)
    master = rank == 0

    with torch.device("meta"):  # shapes only: no rank ever holds all the weights
        raw_model = GPT(cfg)
    raw_model.activation_checkpointing = args.activation_checkpointing
    # real weights, each rank its shard, wrapped as the stage says (DDP, or FSDP in place)
    model = parallelize.parallelize(
        raw_model, args.stage, device, args.dtype, args.seed, args.compile
    )
    params = list(raw_model.named_parameters())  # sharded: no forward has gathered any yet
    max_lr = args.lr * (world_size if args.scale_lr else 1)
    # after sharding (it must hold the shards) and before any forward (which gathers the root)
    optimizer = make_optimizer(raw_model, max_lr, args.weight_decay, device, args.stage)
    start_step = 0
    if ckpt is not None:
        checkpoint.load(ckpt_path, params, optimizer)  # each rank reads the pieces it holds
        start_step = ckpt["step"]
        if master:
            print(f"resuming from {ckpt_path} at step {start_step}")
            if ckpt["world_size"] != world_size:
                print(
                    f"note: saved with {ckpt['world_size']} ranks, now {world_size}: "
                    "the batches differ from an uninterrupted run"
                )
    if distributed:
        checkpoint.check_ranks_agree(device, args.out_dir, step=start_step)
    half = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    # ddp, zero1: autocast; zero2, zero3: FSDP's MixedPrecisionPolicy casts the gathered weights
    use_autocast = args.dtype in ("bf16", "fp16") and args.stage not in parallelize.SHARDED
    autocast = torch.autocast(device.type, dtype=half, enabled=use_autocast)
    # fp16 gradients underflow to 0 without a loss scale; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    if distributed and args.stage not in parallelize.SHARDED:  # DDP's buckets (FSDP has none)
        cluster.build_ddp_buckets(
            model, cfg.vocab_size, args.batch_size, cfg.block_size, device, autocast
        )
    best_val = checkpoint.best_so_far(ckpt)
    if ckpt is not None:  # DCP restored the moments only: the settings are this run's
        mine = checkpoint.optimizer_settings(optimizer)
        changed = checkpoint.changed_settings(ckpt["optimizer"], mine)
        if master and changed:
            print(f"note: this run's optimizer settings, not the saved ones: {', '.join(changed)}")
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])  # the loss scale, so the resume stays exact

    n_params = num_params(raw_model)
    tokens_per_step = args.batch_size * cfg.block_size * args.grad_accum * world_size
    flops_token = flops_per_token(cfg, cfg.block_size)
    if master:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"{args.preset}: {n_params / 1e6:.2f}M parameters, {flops_token / 1e6:.1f} MFLOP "
            f"per token | {world_size} rank(s) on {device.type}, {args.dtype} | "
            f"{tokens_per_step:,} tokens per step = {args.batch_size} batch x "
            f"{cfg.block_size} context x {args.grad_accum} accum x {world_size} ranks"
        )
        memory.print_estimate(raw_model, args, world_size, device)
        report.print_data_passes("train.bin", len(train_tokens), tokens_per_step, args.max_steps)
        log = report.TrainingLog(args, start_step, tokens_per_step, flops_token, world_size, device)
    saver = checkpoint.BackgroundSaver(max_wait=args.timeout / 2, device=device)  # every rank

    def checkpoint_meta(step, best_val_loss):  # meta.json, beside the shards
        return {
            "optimizer": checkpoint.optimizer_settings(optimizer),
            "scaler": scaler.state_dict(),  # {} unless --dtype fp16
            # with the args (schedule, seed), step fixes the LR, the data position and the RNGs
            "step": step,
            "best_val_loss": best_val_loss,
            "world_size": world_size,
            "stage": args.stage,
            "preset": args.preset,
            "config": asdict(cfg),
            "tokenizer": meta["tokenizer"],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }

    step = start_step
    while True:
        last = step >= args.max_steps
        # a resumed run evaluated, sampled and saved its starting step before it stopped
        new_step = step == 0 or step > start_step
        evaluated = new_step and (step % args.eval_every == 0 or last)
        if evaluated:
            val_loss = evaluate(raw_model, val_tokens, args, cfg.block_size, device, autocast, rank)
            if master:
                log.validation(step, val_loss)
        if new_step and step > 0:
            if args.sample_every and (step % args.sample_every == 0 or last):
                # on every rank: with zero2/zero3 each forward gathers weights from all of them
                text = sample(raw_model, meta, device, autocast, seed=0)
                if master:
                    print(f"--- sample at step {step} ---\n{text}\n---")
            # folders, written by every rank (all decide alike): the last, the lowest val loss
            ckpt_dir, best_dir = (args.out_dir / f"{kind}-{step:06d}" for kind in ("ckpt", "best"))
            paths = [ckpt_dir] if step % args.save_every == 0 or last else []
            if evaluated and val_loss < best_val:
                paths.append(best_dir)
            if paths:
                info = checkpoint_meta(step, val_loss if best_dir in paths else best_val)
                if saver.save(checkpoint.state_dict(params, optimizer), paths, info, final=last):
                    best_val = info["best_val_loss"]  # only once best-* is on its way
                    if master:
                        print(f"step {step:5d} | saving {' and '.join(map(str, paths))}")
                elif master:
                    print(f"step {step:5d} | not saved: the last checkpoint is still being written")
                if master:
                    log.plot()
        if last:
            break

        # one optimizer step
        t0 = time.perf_counter()
        lr = lr_at(step, args, max_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # dropout masks from a seed that depends on (seed, rank, step) only: same after a resume
        torch.manual_seed(int(rng(args.seed, DROPOUT_STREAM, rank, step).integers(2**62)))
        keys = (args.seed, TRAIN_STREAM, rank, step)  # this step's windows, the same on resume
        shape = (args.batch_size, cfg.block_size)
        micro_batches = [
            get_batch(train_tokens, *shape, device, *keys, micro, vocab_size=cfg.vocab_size)
            for micro in range(args.grad_accum)
        ]
        t_data = time.perf_counter() - t0
        sync_every = args.sync_every_micro_batch
        loss = forward_backward(model, micro_batches, autocast, scaler, sync_every)
        scaler.unscale_(optimizer)  # fp16: the true gradients, before the norm is clipped
        max_norm = args.grad_clip or math.inf  # 0: infinity, never clips (but gives the norm)
        # the parameters as the optimizer holds them: for zero2/zero3 the sharded DTensors
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm)
        scale = scaler.get_scale()
        scaler.step(optimizer)  # fp16: skipped if a gradient is inf/nan (the same on every rank)
        scaler.update()
        if master and scaler.get_scale() < scale:
            print(f"step {step + 1:5d} | fp16 overflow: skipped; loss scale {scaler.get_scale():g}")
        # in place, not set_to_none: .grad stays a view into DDP's buckets; new .grad tensors in
        # the next no_sync() micro-steps would be a second full copy of the gradients
        optimizer.zero_grad(set_to_none=False)
        loss = loss.item()  # waits for the GPU, so the time below is real
        dt = time.perf_counter() - t0
        step += 1
        if master:
            log.train_step(step, loss, lr, parallelize.global_norm(grad_norm).item(), dt, t_data)

    if master:
        log.close()
    if distributed:
        # every rank is done training before the saves are waited for (with gloo this also makes
        # a rare abort at exit rarer: see docs/gloo_exit_abort.md)
        dist.barrier()
    saver.finish()  # the saves' collectives are in their own group: no training one is left
    if distributed:
        dist.destroy_process_group()
        # workaround (PyTorch 2.13, gloo): give gloo's threads a moment to let go of their last
        # tensors before Python shuts down, or the process can abort after its work is done
        time.sleep(0.1)
    if master:
        last_dir = args.out_dir / f"ckpt-{step:06d}"
        print(f"done: {last_dir}, {args.out_dir / 'metrics.csv'}, {args.out_dir / 'loss.png'}")


if __name__ == "__main__":
    main()
