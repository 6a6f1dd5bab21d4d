"""`imgarena bench`: train-step and inference speed, FLOPs, params and peak memory without data."""

from __future__ import annotations

EXAMPLES = """
imgarena bench --models mixer_t4,vit_t4 --img-size 32 --batch-sizes 1,64
imgarena bench --models mixer_s16,vit_s16 --img-size 224 --batch-sizes 1,32,128 --device cuda
imgarena bench --models mlp,resnet18_cifar --img-size 28 --in-chans 1 --modes infer --json bench.json
"""

BENCH_COLUMNS = [
    ("model", "model"), ("mode", "mode"), ("batch_size", "batch"), ("img_s", "img/s"),
    ("median_ms", "median ms"), ("min_ms", "min ms"), ("p95_ms", "p95 ms"),
    ("peak_mem_mb", "peak MB"), ("params", "params"), ("flops", "FLOPs/img"), ("error", "error"),
]


def register(sub) -> None:
    from imgarena.cli.common import add_command
    from imgarena.config import AMP_MODES

    p = add_command(sub, "bench", "Measure train/inference throughput, latency, FLOPs, params and peak memory (no data needed).",
                    EXAMPLES, run)
    p.add_argument("--models", required=True, help="comma-separated model names (see `imgarena models`)")
    p.add_argument("--img-size", type=int, default=32, help="square input size (default 32)")
    p.add_argument("--in-chans", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--modes", default="train,infer", help="train, infer or both (default train,infer)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--amp", default="auto", choices=list(AMP_MODES),
                   help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convs on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls; median/min/p95 reported (default 10)")
    p.add_argument("--quick", action="store_true", help="1 warm-up call and 3 timed calls: a smoke test, not a measurement")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")


def run(args) -> int:
    from imgarena.cli.common import flags_for
    from imgarena.config import BenchConfig, from_dict, to_dict
    from imgarena.paths import check_output_file
    from imgarena.report import format_table, write_csv, write_json

    d = dict(models=args.models, img_size=args.img_size, in_chans=args.in_chans, num_classes=args.num_classes,
             batch_sizes=args.batch_sizes, modes=args.modes, device=args.device, amp=args.amp,
             channels_last=args.channels_last, warmup=1 if args.quick else args.warmup,
             repeats=3 if args.quick else args.repeats)
    cfg = from_dict(BenchConfig, d, flags=flags_for(d))
    for option in ("json", "csv"):
        if getattr(args, option):
            check_output_file(getattr(args, option), f"--{option}")
    from imgarena.bench import run_bench  # torch, once the options are good

    rows = run_bench(cfg, on_row=lambda r: print(f"  {r['model']} {r.get('mode', '')} batch {r.get('batch_size', '-')}: "
                                                  + (r["error"] if "error" in r else f"{r['img_s']:.1f} img/s"), flush=True))
    print()
    print(format_table(rows, BENCH_COLUMNS))
    print(f"\ndevice {rows[0]['device'] if rows else cfg.device}; {cfg.warmup} warm-up + {cfg.repeats} timed calls; "
          "peak MB = weights + what the call allocates (see `imgarena.bench`)")
    if args.json:
        write_json(args.json, {"config": to_dict(cfg), "rows": rows})
    if args.csv:
        write_csv(args.csv, rows)
    return 1 if rows and all("error" in r for r in rows) else 0

