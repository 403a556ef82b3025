"""The `emoe` subcommands: each wires modules together for one job (the parser is in cli.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import default_model_dir


def _model(args) -> str:
    """--model, else the model folder a --profile sits in (`emoe profile --out DIR/profile`), else the
    embedded model."""
    profile = getattr(args, "profile", None)
    if args.model is None and profile and (Path(profile).parent / "config.json").is_file():
        return str(Path(profile).parent)
    path = args.model or default_model_dir()
    if str(path).endswith(".gguf"):
        return _gguf_import_dir(Path(path))
    if args.model is None and not (Path(path) / "model.safetensors").is_file():
        sys.exit(f"emoe: the embedded model is missing at {path}; train it with `emoe train-model` or pass --model")
    return path


def _gguf_import_dir(path: Path) -> str:
    """A GGUF given as --model, as llama.cpp takes one: imported once (experts left in the file) into
    $EMOE_CACHE (default ~/.cache/emoe)/gguf/NAME-BYTES, reused while that file is unchanged."""
    import os

    from .gguf_import import GGUFError, import_gguf, shards
    if not path.is_file():
        sys.exit(f"emoe: {path} does not exist")
    try:
        files = shards(path.resolve())
    except GGUFError as e:
        sys.exit(f"emoe: {e}")
    size = sum(f.stat().st_size for f in files)
    out = Path(os.environ.get("EMOE_CACHE") or Path.home() / ".cache" / "emoe") / "gguf" / f"{path.stem}-{size}"
    try:
        meta = json.loads((out / "gguf.json").read_text())
        if [f["path"] for f in meta["files"]] == [str(f) for f in files] and (out / "config.json").is_file():
            return str(out)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    import torch
    lean = not torch.cuda.is_available()  # a CPU runs the dense projections on the file's blocks: no float copies
    print(f"emoe: importing {path.name} once into {out} (the experts{' and dense projections' if lean else ''} stay "
          f"in the file; `emoe import-gguf` chooses the folder)", file=sys.stderr)
    try:
        return str(import_gguf(path, out, lean=lean))
    except GGUFError as e:
        sys.exit(f"emoe: {e}")


def _profile_dir(args, model: str, required: bool = False) -> str | None:
    """--profile, else the profile shipped inside the model folder (the embedded model has one)."""
    if getattr(args, "profile", None):
        return args.profile
    shipped = Path(model) / "profile"
    if (shipped / "profile.json").is_file():
        return str(shipped)
    if required:
        raise ValueError(f"no profile: pass --profile (create one with `emoe profile --model {model} --out DIR`)")
    return None


def _default_placement(args, model: str, budget: float) -> None:
    """--miss-policy, --budget and --experts-on where not given. Without --miss-policy: where the model has
    a profile, its residency policy decides (the reroute path, which --policy refines); where it has none,
    auto, which is exact: each miss runs on the host or is loaded, whichever the start-up timing says is faster. Without a GPU, a model whose experts are all
    packed (a GGUF import, an MXFP4 or FP8 release) and no profile runs as llama.cpp does on a CPU: experts
    held in RAM as packed (their host forms where RAM holds them), none dequantised into a float32 fast tier
    four times the file's size (budget 0, host misses); with the forms it decoded 2-3x faster than all-resident
    float32; where those experts outgrow the RAM available, they stay on disk in kernel forms instead
    (_larger_than_ram), as they do for a profiled model, whose plan then picks the held ones. A GGUF's dense
    projections run on the file's own blocks (--dense-blocks) unless told otherwise; dense int8 stays opt-in: it
    cost 3-35% of next-token agreement across the models measured."""
    import torch

    from .forms import packed_experts
    unset = args.miss_policy is None and args.budget is None and args.experts_on is None
    if unset and not torch.cuda.is_available() and (prof_dir := _profile_dir(args, model)) and packed_experts(model):
        _larger_than_ram(args, model, prof_dir)
    elif unset and not torch.cuda.is_available() and packed_experts(model):
        args.miss_policy, args.budget, args.experts_on = "host", 0.0, "ram"
        if not _larger_than_ram(args, model):
            print("[emoe] no GPU: the experts stay in RAM in their packed blocks (GGUF, MXFP4, FP8) and run there, on the "
                  "CPU in kernel forms where RAM holds them (emoe's C routines), and a GGUF's dense projections on its own blocks "
                  "(--budget 1 holds the experts dequantised instead, --no-dense-blocks the dense as float copies; "
                  "--dense-int8 runs the MXFP4 and FP8 releases' dense projections as int8, at some accuracy)", file=sys.stderr)
    if args.dense_blocks is None:  # a GGUF's own blocks: llama.cpp's arithmetic, faster than float copies
        args.dense_blocks = not torch.cuda.is_available()
    args.budget = budget if args.budget is None else args.budget
    args.experts_on = args.experts_on or "disk"
    if args.miss_policy is None:
        args.miss_policy = "reroute" if _profile_dir(args, model) else "auto"


def _larger_than_ram(args, model: str, prof_dir: str | None = None) -> bool:
    """Where the packed experts would take more than 80% of the RAM available: they stay on disk as kernel forms
    (formstore) and the fast tier holds what 60% of it holds, loaded on demand (LRU: exact). With the file mapped,
    llama.cpp's page cache thrashes instead: docs/results/larger_than_ram.txt. With a profile, the held experts
    are its plan's and misses are read, unless LRU would read less (`-adapt`: on the embedded model from disk the
    plan read 23-29% less than LRU; docs/results/eval_serving_counts.txt)."""
    from .checkpoint import Checkpoint
    from .store import _mem_available
    experts = sum(locs.nbytes for locs in Checkpoint(model).experts.values())
    avail = _mem_available()
    if avail is None or experts <= 0.8 * avail:
        return False
    args.miss_policy, args.budget, args.experts_on = "load", float(int(0.6 * avail)), "disk"
    how = "the others read when routed to"
    if prof_dir:
        args.miss_policy = "reroute"  # the profile's residency path: the policy's own miss rule (adapt) replaces it
        if getattr(args, "policy", None) is None:
            args.policy = "emoe-a-adapt" if (Path(prof_dir) / "predictor-a").is_dir() else "task-static-adapt"
        how = f"which the profile's plan picks ({args.policy}), the others read when routed to"
    print(f"[emoe] no GPU, and the experts ({experts / 2**30:.1f} GiB packed) outgrow the {avail / 2**30:.1f} GiB of RAM "
          f"available: they stay on disk in kernel forms, {args.budget / 2**30:.1f} GiB of them held in RAM, {how} "
          f"(--budget BYTES sets how much is held)", file=sys.stderr)
    return True


def _below_all(budget: float) -> bool:
    """A budget that holds less than every expert: a fraction below 1, or bytes (budgets above 1 are bytes)."""
    return budget != 1.0


def _warn_unprofiled(args, model: str, prof_dir: str | None) -> None:
    if prof_dir is None and _below_all(args.budget) and args.miss_policy == "reroute":
        print(f"[emoe] {model} has no profile: misses are rerouted over an even split of the budget, which "
              f"changes outputs; profile it (`emoe profile --model {model} --out DIR --budget {args.budget:g}`, "
              f"then --profile DIR) or pass --miss-policy auto (exact: misses run in the slow tier, or are loaded where "
              f"that is faster)", file=sys.stderr)


def _predictors(profile_dir: str, policies: list[str]) -> dict:
    from .predictor import Predictor
    out = {}
    for kind in ("a", "l", "u"):
        d = Path(profile_dir) / f"predictor-{kind}"
        if d.is_dir():
            out[kind] = Predictor.load(d)
    need = {"emoe-a": "a", "emoe-e": "a", "emoe-l": "l", "emoe-a-hybrid": "a", "emoe-a-prompt": "a",
            "emoe-a-sticky": "a", "emoe-a-selective": "a", "emoe-u": "u", "emoe-u-prompt": "u"}
    missing = sorted({need[p] for p in policies if p in need and need[p] not in out})
    if missing:
        raise ValueError(f"{profile_dir} has no predictor-{missing[0]}; run `emoe train-predictor {profile_dir}`")
    return out


def _residency(model: str, profile_dir: str, name: str | None, stickiness: float = 0.0):
    """(miss policy, residency factory, profile) for a named policy. Default: eMoE-A (task-static without a
    predictor) with int4/int8 copies of the experts not held in full: at 40% of expert bytes it keeps
    0.98 teacher-forced agreement where the paper's rerouting keeps 0.42 (README, Results)."""
    from .eval import Setup, build
    from .profile import Profile
    prof = Profile.load(profile_dir, model)
    if name is None:
        name = "emoe-a-q48" if (Path(profile_dir) / "predictor-a").is_dir() else "task-static-q48"
    policy, residency = build(name, Setup(prof, _predictors(profile_dir, [name]), stickiness=stickiness))
    return policy, residency, prof, name


def cmd_generate(args) -> None:
    from .engine import Engine, EngineConfig, SamplingParams
    rules = _json_schema(args.json_schema)
    model = _model(args)
    _default_placement(args, model, budget=1.0)
    policy = residency = None
    task = args.task
    prof_dir = _profile_dir(args, model) if _below_all(args.budget) and args.miss_policy == "reroute" else None
    if args.policy is not None and prof_dir is None:
        raise ValueError("--policy needs a profile and --miss-policy reroute with a budget below 1.0")
    _warn_unprofiled(args, model, _profile_dir(args, model))
    if prof_dir:  # eMoE residency from the profile; the task from the prompt unless given
        from .tasks import TaskExtractor
        policy, residency, prof, name = _residency(model, prof_dir, args.policy)
        if prof.extractor:
            task = TaskExtractor.from_json(prof.extractor).extract(args.prompt, task)
    eng = Engine(EngineConfig(model, budget=args.budget, miss_policy=policy.name if policy else args.miss_policy,
                              experts_on=args.experts_on, max_batch=1, dtype=args.dtype, kv_dtype=args.kv_dtype,
                              host_kernel=args.host_kernel, dense_int8=args.dense_int8,
                              dense_blocks=args.dense_blocks, host_int8=args.host_int8,
                              host_form_bits=args.host_form_bits), policy=policy, residency=residency)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, grammar=rules)
    t0 = time.perf_counter()
    (req,) = eng.generate([args.prompt], params, tasks=[task], chat=not args.raw)
    print(eng.text(req))
    how = f", {name} residency, task {task}" if prof_dir else ""
    print(eng.summary(time.perf_counter() - t0) + how, file=sys.stderr)


def cmd_train_model(args) -> None:
    import torch
    from .train import TrainConfig, train
    torch.set_num_threads(args.threads)
    out = Path(args.out or default_model_dir())
    cfg = TrainConfig(minutes=args.minutes, seq=args.seq, batch=args.batch, lr=args.lr, seq_entropy=args.seq_entropy,
                      trainable=args.trainable)
    general = Path(args.general_text) if args.general_text else None
    if general is not None and not general.is_file():
        sys.exit(f"emoe: general text {general} not found; build it with `python scripts/build_data.py --general-text`")
    print(train(out, Path(args.run_dir), general, cfg, overwrite=args.overwrite,
                init=Path(args.init) if args.init else None))


def cmd_quantize(args) -> None:
    """int4/int8 copies of every expert, once, beside the checkpoint: shadow policies read them at startup."""
    import torch

    from .checkpoint import Checkpoint
    from .calibrate import MIN_TOKENS
    from .copies import save_copies
    from .quant import copy_group, kernel_fits
    from .store import open_store
    if args.calibrate < 0 or args.calibrate and 4 not in args.bits:
        raise ValueError(f"--calibrate N fits int4 copies on N >= 1 prompts per task (--bits {args.bits}, N "
                         f"{args.calibrate})")
    if args.data and not args.calibrate:
        raise ValueError("--data names the prompts --calibrate N runs; without --calibrate nothing reads it")
    model = _model(args)
    ckpt = Checkpoint(model)
    store, t0 = open_store(ckpt, "disk"), time.perf_counter()
    shapes = [tuple(t.shape) for t in store.read(*min(ckpt.experts))]
    kernel = args.layout == "kernel" or args.layout == "auto" and not torch.cuda.is_available() and all(
        kernel_fits(s, 32) for s in shapes)
    hess, note = None, ""
    if args.calibrate:
        from tqdm import tqdm

        from . import datasets
        from .calibrate import Passes
        datasets.use(args.data)
        examples = [e for t in datasets.tasks() for e in datasets.load_split("train", t)[: args.calibrate]]
        hess = Passes(model, examples, args.max_tokens, on_batch=lambda n: bar.update(n))
        bar = tqdm(total=len(examples) * len(hess.groups), desc="calibrating", unit="prompt", disable=None)
        note = f"{len(examples)} training prompts" + (f" of {Path(args.data).name}" if args.data else "")
    for b in sorted(args.bits):  # (int4 first: the calibration's passes run as its copies are fitted)
        path = save_copies(model, store, sorted(ckpt.experts), b, copy_group([s[1] for s in shapes], b, kernel),
                           hess, note if b == 4 else "")
        if hess is not None and b == 4:
            bar.close()
            print(f"[emoe] calibrated on {note}, {len(hess.groups)} pass(es) over them: {hess.fitted} of "
                  f"{len(ckpt.experts)} experts had >= {MIN_TOKENS} tokens (the rest keep the plain fit)", file=sys.stderr)
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")


def _json_schema(text: str | None) -> str | None:
    """--json-schema: inline JSON, a file's path, or 'object'; compiled (emoe.grammar) before the model loads."""
    if text is None:
        return None
    from . import grammar
    if text == "object":
        return grammar.response_format({"type": "json_object"})
    if not text.lstrip().startswith("{"):
        if not Path(text).is_file():
            raise ValueError(f"--json-schema {text!r} is neither JSON, 'object' nor a file")
        text = Path(text).read_text()
    return grammar.json_schema(text)


def cmd_import_gguf(args) -> None:
    import torch

    from .checkpoint import Checkpoint
    from .gguf_import import import_gguf
    t0 = time.perf_counter()
    out = import_gguf(args.gguf, args.out, getattr(torch, args.dtype), lean=args.lean)
    ck = Checkpoint(out)  # the folder loads: config, dense tensors and every expert's place in the file
    c = ck.config
    print(f"{out}: {c.family}, {c.num_layers} layers, {len(ck.experts)} experts of {ck.expert_nbytes / 2**20:.2f} MiB "
          f"packed in {len(json.loads((out / 'gguf.json').read_text())['files'])} GGUF file(s); dense tensors "
          f"{sum(f.stat().st_size for f in out.glob('dense-*.safetensors')) / 2**20:.1f} MiB"
          f"{f' ({len(ck.in_file)} projections left in the GGUF)' if ck.in_file else ''}; "
          f"{time.perf_counter() - t0:.1f} s. "
          f"Serve it with `emoe serve --model {out}`")


def cmd_serve(args) -> None:
    import uvicorn

    from .engine import Engine, EngineConfig
    from .metrics import Metrics
    from .server import create_app, serve_threads
    from .serving import EngineLoop
    model = _model(args)
    _default_placement(args, model, budget=0.4)
    prof = extractor = policy = residency = None
    prof_dir = _profile_dir(args, model)
    _warn_unprofiled(args, model, prof_dir)
    if prof_dir:  # profiled costs and task extractor for the scheduler; the eMoE loader when rerouting
        from .profile import Profile
        from .tasks import TaskExtractor
        prof = Profile.load(prof_dir, model)
        extractor = TaskExtractor.from_json(prof.extractor) if prof.extractor else None
        if args.miss_policy == "reroute" and _below_all(args.budget):
            policy, residency, prof, name = _residency(model, prof_dir, args.policy, args.stickiness)
            print(f"[emoe] residency policy {name} (stickiness {args.stickiness:g}), miss policy {policy.name}",
                  file=sys.stderr)
    if args.policy is not None and residency is None:
        raise ValueError("--policy needs a profile and --miss-policy reroute with a budget below 1.0")
    from .datasets import TASKS
    from .scheduler import check_slo_tasks
    check_slo_tasks(dict(args.slo or []), extractor.known_tasks if extractor is not None else TASKS)  # before loading
    import torch
    torch.set_num_threads(serve_threads(args.threads))
    print(f"[emoe] engine threads {torch.get_num_threads()}", file=sys.stderr)
    eng = Engine(EngineConfig(model, budget=args.budget, miss_policy=policy.name if policy else args.miss_policy,
                              experts_on=args.experts_on, max_batch=args.max_batch, max_len=args.max_len,
                              prefill_chunk=args.prefill_chunk, prefix_reuse=args.prefix_reuse,
                              prompt_cache_mb=args.prompt_cache_mb,
                              dtype=args.dtype, kv_dtype=args.kv_dtype, host_kernel=args.host_kernel,
                              dense_int8=args.dense_int8, dense_blocks=args.dense_blocks, host_int8=args.host_int8,
                              host_form_bits=args.host_form_bits, async_loads=args.async_loads,
                              memory_bytes=int(args.memory_mb * 2**20) if args.memory_mb else None),
                 policy=policy, residency=residency)
    served = args.served_model_name or (Path(args.model).stem if str(args.model).endswith(".gguf") else Path(model).name)
    from .scheduler import make_scheduler
    loop = EngineLoop(eng, make_scheduler(args.scheduler, args.admission_control), prof,
                      max_waiting=args.max_waiting, token_budget=args.token_budget, metrics=Metrics(served),
                      interleave=args.prefill_interleave)
    app = create_app(loop, served, args.api_key, extractor, default_slos=dict(args.slo or []),
                     shutdown_grace_s=args.grace, tool_parser=args.tool_call_parser, reasoning=args.reasoning_parser)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT/SIGTERM: new requests get 503 while in-flight ones finish
            loop.stop_accepting()
            super().handle_exit(sig, frame)

    print(eng.memory_line(), file=sys.stderr)
    print(f"[emoe] serving {served} ({args.scheduler} scheduler, budget {args.budget}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                              timeout_graceful_shutdown=max(1, int(args.grace)))).run()
    except KeyboardInterrupt:  # uvicorn re-raises the captured SIGINT after its graceful shutdown
        pass
