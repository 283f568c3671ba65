"""Pre-train a Llama with DistributedDataParallel over a sharded token stream, CPU or GPUs.

    python 06_llama_ddp/make_toy_data.py                     # once: writes train.pkl, val.pkl
    python 06_llama_ddp/train.py --train_file train.pkl --valid_file val.pkl     # one process
    torchrun --standalone --nproc-per-node=4 06_llama_ddp/train.py \
        --train_file train.pkl --valid_file val.pkl --resume

No rank draws random windows: the DistributedDataLoader (data.py) gives rank r of W its own
consecutive slice of the one token stream at every micro-step, and its position (batches taken) is
saved in the checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have
seen. Rank 0 logs, plots and writes checkpoints; every rank evaluates.
"""

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import checkpoint
import cluster
import report
import torch
import torch.distributed as dist
from data import DistributedDataLoader, TokenFileError, load_tokens
from model import CHECKPOINT_FORMAT, PRESETS, Llama, config_for, flops_per_token, num_params
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = Path(__file__).resolve().parent
PROG = "train.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model size (model.py)")
    p.add_argument("--train_file", type=Path, default=Path("train.pkl"), help=".pkl, .npy, .bin")
    p.add_argument("--valid_file", type=Path, default=Path("val.pkl"), help=".pkl, .npy, .bin")
    p.add_argument(
        "--bin_dtype", choices=["uint16", "uint32"], help="for .bin without header; unset: uint16"
    )
    p.add_argument("--seq_len", type=int, help="unset: the preset's context")
    p.add_argument("--vocab_size", type=int, help="embedding rows; unset: the preset's")
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
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt if any")
    p.add_argument(
        "--timeout", type=float, default=600, help="seconds a collective waits for all ranks"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--activation_checkpointing", action="store_true", help="less memory, +1/3 time")
    p.add_argument("--peak_flops", type=float, help="device FLOP/s for MFU (unset: table/measured)")
    p.add_argument("--seed", type=int, default=1337, help="initial weights")
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
    context = PRESETS[args.preset]["max_seq_len"]
    if args.seq_len is None:
        args.seq_len = context
    if not 0 < args.seq_len <= context:
        p.error(f"--seq_len must be between 1 and {context}, the {args.preset} preset's context")
    if args.vocab_size is not None and args.vocab_size <= 0:
        p.error("--vocab_size must be positive")
    if args.tensorboard and report.tensorboard_missing():
        p.error(report.tensorboard_missing())
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


def load_split(path, args, vocab_size, rank, world_size):
    """This rank's loader over a token file; any problem with the file ends the run in one line."""
    try:
        # .npy and .bin are memory-mapped: every rank maps the same file, the OS keeps one copy
        tokens = load_tokens(path, vocab_size, args.bin_dtype)
        return DistributedDataLoader(
            tokens, args.batch_size, args.seq_len, rank, world_size, str(path), vocab_size
        )
    except TokenFileError as e:
        fail(str(e))


def get_batch(loader, device):
    """The loader's next (inputs, next-token targets), on the training device."""
    try:
        x, y = loader.next_batch()
    except TokenFileError as e:  # an id past the embedding: a device-side assert on CUDA
        fail(str(e))
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        x, y = (t.pin_memory().to(device, non_blocking=True) for t in (x, y))
    return x, y


def lr_at(step, args, max_lr):
    """Linear warm-up, then cosine decay to max_lr / 10 at max_steps."""
    if step < args.warmup_steps:
        return max_lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return max_lr / 10 + (max_lr - max_lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay, device):
    # weight decay on matrices only: decaying biases and LayerNorm gains towards 0 only hurts
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one CUDA kernel updates all parameters instead of several per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def forward_backward(model, micro_batches, autocast, scaler=None):
    """Sum the gradients of all micro-batches into .grad; return their mean loss. With an fp16
    GradScaler the gradients are those of the loss times its scale (unscale_ divides it out).

    DDP all-reduces gradients while backward runs. Inside no_sync() it only accumulates them
    locally, so all micro-batches but the last skip communication: one all-reduce per optimizer
    step, whatever --grad_accum is. Forward must be inside no_sync() too, because DDP decides at
    forward time whether the coming backward will synchronise.
    """
    n = len(micro_batches)
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        skip_sync = isinstance(model, DDP) and i < n - 1
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast:
                _, loss = model(x, y)
            # each loss is a mean over its micro-batch; dividing by n makes the summed gradient
            # the gradient of the mean over all n micro-batches, as if they were one big batch
            (loss / n if scaler is None else scaler.scale(loss / n)).backward()
        total += loss.detach()
    return total / n


@torch.no_grad()
def evaluate(model, loader, args, device, autocast):
    """Mean validation loss over the first eval_batches batches of every rank's validation shard,
    reduced across ranks. Every rank must run it: all_reduce waits for all of them."""
    model.eval()
    loader.batches_taken = 0  # the same validation batches at every evaluation
    total = torch.zeros(2, device=device)  # sum of batch losses, number of batches
    for _ in range(min(args.eval_batches, loader.steps_per_pass)):  # no window counted twice
        x, y = get_batch(loader, device)
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.float(), torch.ones((), device=device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def decode(ids, vocab_size):
    """Text for the byte vocabulary of make_toy_data.py; the ids themselves for any other one
    (token files carry no tokenizer: decode them with the one that made them)."""
    if vocab_size != 256:
        return " ".join(map(str, ids))
    text = bytes(ids).replace(b"\0", b"\n").decode("utf-8", errors="replace")
    # other control bytes (escape, carriage return, backspace...) would act on the terminal
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def sample(model, device, autocast, seed, n_tokens=200):
    model.eval()
    start = torch.zeros((1, 1), dtype=torch.long, device=device)  # id 0: a document separator
    gen = torch.Generator(device=device).manual_seed(seed)
    with autocast:
        out = model.generate(start, n_tokens, temperature=0.8, top_k=50, generator=gen)
    model.train()
    return decode(out[0, 1:].tolist(), model.cfg.vocab_size)


def load_checkpoint(path, cfg, preset):
    ckpt = checkpoint.load(path)
    if ckpt["config"] != asdict(cfg):
        fail(
            f"{path} holds a '{ckpt['preset']}' model (vocabulary {ckpt['config']['vocab_size']})"
            f", not --preset {preset} with vocabulary {cfg.vocab_size}; use --preset "
            f"{ckpt['preset']} and its --vocab_size, or another --out_dir"
        )
    return ckpt


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

    # everything that can fail on bad input is checked before the process group exists
    cfg = config_for(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    if args.plan:  # for a GPU, on any machine: no data, no process group
        return report.print_plan(args, cfg, Llama, args.seq_len)
    train_loader = load_split(args.train_file, args, cfg.vocab_size, rank, world_size)
    val_loader = load_split(args.valid_file, args, cfg.vocab_size, rank, world_size)
    ckpt_path = args.out_dir / "ckpt.pt"
    best_path = args.out_dir / "best.pt"  # the lowest validation loss so far, beside the last
    ckpt = None
    if ckpt_path.exists():
        if not args.resume:
            fail(f"{ckpt_path} exists; pass --resume to continue it, or choose another --out_dir")
        ckpt = load_checkpoint(ckpt_path, cfg, args.preset)

    if distributed:
        cluster.init_process_group(device, args.timeout)
    master = rank == 0

    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    with torch.device(device):  # build on the GPU directly: no full fp32 copy in host RAM
        raw_model = Llama(cfg)
    raw_model.activation_checkpointing = args.activation_checkpointing
    max_lr = args.lr * (world_size if args.scale_lr else 1)
    optimizer = make_optimizer(raw_model, max_lr, args.weight_decay, device)
    start_step = 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        start_step = ckpt["step"]
        train_loader.load_state_dict(ckpt["loader"])  # continue the stream where it stopped
        if master:
            print(f"resuming from {ckpt_path} at step {start_step}")
            if ckpt["world_size"] != world_size:
                print(
                    f"note: saved with {ckpt['world_size']} ranks, now {world_size}: "
                    "the batches differ from an uninterrupted run"
                )
    model = torch.compile(raw_model) if args.compile else raw_model
    if distributed:
        position = train_loader.batches_taken
        checkpoint.check_ranks_agree(device, ckpt_path, step=start_step, loader_position=position)
        # gradient_as_bucket_view: .grad tensors are views into DDP's buckets, not a second copy of
        # all gradients (4.4 GB at 1.1B parameters).
        model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        # no buffer broadcast at every step: ours never change (05 has none, 06 its RoPE tables),
        # unlike BatchNorm's statistics. Set as an attribute: torch 2.13 deprecates the argument.
        model.broadcast_buffers = False
    half = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, dtype=half, enabled=args.dtype in ("bf16", "fp16"))
    # fp16 gradients underflow to 0 without a loss scale; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    if distributed:
        cluster.build_ddp_buckets(
            model, cfg.vocab_size, args.batch_size, args.seq_len, device, autocast
        )
    best_val = checkpoint.best_so_far(ckpt)
    if ckpt is not None:  # AdamW's state only now: it did not exist while DDP regrouped
        changed = checkpoint.load_optimizer(optimizer, ckpt["optimizer"])
        if master and changed:
            print(f"note: this run's optimizer settings, not the saved ones: {', '.join(changed)}")
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])  # the loss scale, so the resume stays exact
        del ckpt  # free its copy of the weights

    n_params = num_params(raw_model)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world_size
    flops_token = flops_per_token(cfg, args.seq_len)
    if master:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"{args.preset}: {n_params / 1e6:.2f}M parameters, {flops_token / 1e6:.1f} MFLOP "
            f"per token | {world_size} rank(s) on {device.type}, {args.dtype} | "
            f"{tokens_per_step:,} tokens per step = {args.batch_size} batch x "
            f"{args.seq_len} context x {args.grad_accum} accum x {world_size} ranks"
        )
        report.print_memory_estimate(cfg, n_params, args, args.seq_len, device, world_size)
        n_train = len(train_loader.tokens)
        report.print_data_passes(args.train_file, n_train, tokens_per_step, args.max_steps)
        log = report.TrainingLog(args, start_step, tokens_per_step, flops_token, world_size, device)
        saver = checkpoint.BackgroundSaver(max_wait=args.timeout / 2)

    def checkpoint_state(step, best_val_loss):
        return {
            "format": CHECKPOINT_FORMAT,
            "model": raw_model.state_dict(),  # the unwrapped model: no module./_orig_mod. keys
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),  # {} unless --dtype fp16
            # with the args (schedule, seed), step fixes the LR
            "step": step,
            "best_val_loss": best_val_loss,
            "loader": train_loader.state_dict(),  # the data position: batches taken so far
            "world_size": world_size,
            "preset": args.preset,
            "config": asdict(cfg),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }

    step = start_step
    while True:
        last = step >= args.max_steps
        # a resumed run evaluated, sampled and saved its starting step before it stopped
        new_step = step == 0 or step > start_step
        evaluated = new_step and (step % args.eval_every == 0 or last)
        if evaluated:
            val_loss = evaluate(raw_model, val_loader, args, device, autocast)
            if master:
                log.validation(step, val_loss)
        if master and new_step and step > 0:
            if args.sample_every and (step % args.sample_every == 0 or last):
                text = sample(raw_model, device, autocast, seed=0)
                print(f"--- sample at step {step} ---\n{text}\n---")
            paths = [ckpt_path] if step % args.save_every == 0 or last else []
            if evaluated and val_loss < best_val:
                paths.append(best_path)
            if paths:
                state = checkpoint_state(step, val_loss if best_path in paths else best_val)
                if saver.save(state, paths, final=last):
                    best_val = state["best_val_loss"]  # only once best.pt is on its way
                    print(f"step {step:5d} | saving {' and '.join(map(str, paths))}")
                else:
                    print(f"step {step:5d} | not saved: the last checkpoint is still being written")
                log.plot()
        if last:
            break

        # one optimizer step
        t0 = time.perf_counter()
        lr = lr_at(step, args, max_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [get_batch(train_loader, device) for _ in range(args.grad_accum)]
        t_data = time.perf_counter() - t0
        loss = forward_backward(model, micro_batches, autocast, scaler)
        scaler.unscale_(optimizer)  # fp16: the true gradients, before the norm is clipped
        max_norm = args.grad_clip or math.inf  # 0: infinity, never clips (but gives the norm)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
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
            log.train_step(step, loss, lr, grad_norm.item(), dt, t_data)

    if master:
        log.close()
    if distributed:
        # every rank is done before anyone tears down (with gloo this also makes a rare abort at
        # exit rarer: see docs/gloo_exit_abort.md); rank 0's last write goes on after it
        dist.barrier()
        dist.destroy_process_group()
        # workaround (PyTorch 2.13, gloo): give gloo's threads a moment to let go of their last
        # tensors before Python shuts down, or the process can abort after its work is done
        time.sleep(0.1)
    if master:
        saver.finish()  # no collective is left that another rank could wait in
        print(f"done: {ckpt_path}, {args.out_dir / 'metrics.csv'}, {args.out_dir / 'loss.png'}")


if __name__ == "__main__":
    main()
