"""The lmms-eval plugin (matvlm.eval.lmms): found by lmms-eval's registry through the entry point, answering
real lmms-eval Instances the way matvlm's own path does (teacher and hybrid), log-likelihoods against a
hand computation, and `python -m lmms_eval --model matvlm` end to end on a tiny local task."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from importlib.util import find_spec

import pytest
import torch
from PIL import Image

from matvlm.convert import convert
from matvlm.engine.simple import answer_batch
from matvlm.errors import MatvlmError
from matvlm.toy import shapes
from matvlm.toy.demo import ASSET
from matvlm.toy.teacher import TEMPLATE, question_of

needs_lmms = pytest.mark.skipif(find_spec("lmms_eval") is None, reason="lmms-eval is not installed (README, "
                                "'lmms-eval': pip install --no-deps lmms-eval==0.7.3 plus its listed deps)")
TASK, SPLIT = "shapes_tiny", "test"


def instance(kind, args, doc_id):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def cut(text, stops):
    """What a stop string leaves of an answer (the engine cuts at the first stop, then lmms-eval strips)."""
    hits = [text.find(s) for s in stops if s in text]
    return text[:min(hits)].strip() if hits else text


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shapes-VQA questions (describe answers contain commas, for the stop-string cases) as lmms-eval docs."""
    root = tmp_path_factory.mktemp("lmms-shapes")
    path = shapes.write_dataset(root, 2, seed=5, split=SPLIT, questions_per_image=4)
    docs = [{"id": r["id"], "question": question_of(r), "image": str(root / r["image"]), "answer": r["answer"]}
            for r in json.loads(path.read_text())]
    assert any("," in d["answer"] for d in docs)
    return root, docs


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return convert(ASSET, tmp_path_factory.mktemp("lmms-student") / "student", mamba_ratio=0.25)


@pytest.fixture(scope="module", params=["teacher", "hybrid"])
def lm(request, data, student_dir):
    from matvlm.eval.lmms import MatvlmLMM

    model = MatvlmLMM(pretrained=str(ASSET if request.param == "teacher" else student_dir), batch_size=4,
                      device="cpu", dtype="float32")
    model.task_dict = {TASK: {SPLIT: data[1]}}
    if request.param == "hybrid":
        assert model.model.hybrid_config.mamba_layers
    return model


def test_importing_matvlm_does_not_import_lmms_eval_and_a_missing_lmms_eval_is_one_clear_error():
    code = ("import sys, matvlm, matvlm.cli, matvlm.eval.run, matvlm.engine.engine\n"
            "assert 'lmms_eval' not in sys.modules, 'matvlm imported lmms_eval'\n"
            "sys.modules['lmms_eval'] = None\n"
            "try:\n    import matvlm.eval.lmms\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    err = out.stdout.strip()
    assert err.startswith("ERR matvlm.eval.lmms needs lmms-eval: pip install")
    assert "pip install --no-deps lmms-eval==0.7.3" in err
    assert "\n" not in err


@needs_lmms
def test_lmms_eval_registry_finds_matvlm_through_the_entry_point():
    from lmms_eval.models import get_model, get_model_manifest, list_available_models

    from matvlm.eval.lmms import MatvlmLMM

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "matvlm"]
    assert eps, "no lmms_eval.models entry point 'matvlm': reinstall matvlm (pip install -e . --no-deps)"
    assert eps[0].value == "matvlm.eval.lmms:manifest"
    assert "matvlm" in list_available_models()
    assert get_model_manifest("matvlm").simple_class_path == "matvlm.eval.lmms.MatvlmLMM"
    assert get_model("matvlm") is MatvlmLMM


@needs_lmms
def test_generate_until_matches_matvlm_answers_with_stops_and_lengths(lm, data):
    docs = data[1]
    questions, images = [d["question"] for d in docs], [d["image"] for d in docs]
    eng = lm.engine
    full = answer_batch(eng.model, eng.processor, questions, images, TEMPLATE, max_new_tokens=48)
    short = answer_batch(eng.model, eng.processor, questions, images, TEMPLATE, max_new_tokens=2)
    # one mixed batch: plain greedy, a stop string (str and list forms), a token limit, and do_sample=False
    # overriding a temperature; in shuffled order, so results must come back in request order
    kinds = [({"max_new_tokens": 48, "temperature": 0}, lambda i: full[i]),
             ({"max_new_tokens": 48, "until": [","]}, lambda i: cut(full[i], [","])),
             ({"max_new_tokens": 48, "until": " the ", "temperature": 0.7, "do_sample": False},
              lambda i: cut(full[i], [" the "])),
             ({"max_new_tokens": 2, "num_beams": 1, "top_p": 1.0}, lambda i: short[i])]
    plan = [(i, kinds[i % len(kinds)]) for i in reversed(range(len(docs)))]
    plan += [(i, kinds[1]) for i in range(len(docs)) if "," in full[i]]  # where the stop string really cuts
    reqs = [instance("generate_until", (docs[i]["question"], dict(kw), doc_to_visual, i, TASK, SPLIT), i)
            for i, (kw, _) in plan]
    expected = [want(i) for i, (_, want) in plan]
    assert lm.generate_until(reqs) == expected


@needs_lmms
def test_generate_until_refuses_what_the_engine_cannot_do(lm, data):
    bad_beams = instance("generate_until", ("q", {"num_beams": 3}, doc_to_visual, 0, TASK, SPLIT), 0)
    with pytest.raises(MatvlmError, match="beam search"):
        lm.generate_until([bad_beams])
    video = instance("generate_until", ("q", {}, lambda doc: ["clip.mp4"], 0, TASK, SPLIT), 0)
    with pytest.raises(MatvlmError, match="images only"):
        lm.generate_until([video])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])


@needs_lmms
@torch.no_grad()
def test_loglikelihood_equals_a_plain_forward_by_hand(lm, data):
    docs = data[1][:5]
    proc, model = lm.engine.processor, lm.engine.model
    conts = [" " + d["answer"] for d in docs] + [" purple", " no"]
    rows = list(range(len(docs))) + [0, 1]
    reqs = [instance("loglikelihood", (docs[r]["question"], c, doc_to_visual, r, TASK, SPLIT), r)
            for r, c in zip(rows, conts)]
    # a `loglikelihood`-type task passes its doc_to_target function instead of the continuation
    reqs.append(instance("loglikelihood", (docs[2]["question"], lambda doc: " " + doc["answer"], doc_to_visual, 2,
                                           TASK, SPLIT), 2))
    rows.append(2)
    conts.append(" " + docs[2]["answer"])
    got = lm.loglikelihood(reqs)
    assert len(got) == len(reqs)
    for (logp, greedy), r, c in zip(got, rows, conts):
        image = doc_to_visual(docs[r])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": docs[r]["question"]}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ctx = proc(text=[prompt], images=image, return_tensors="pt")["input_ids"][0]
        whole = proc(text=[prompt + c], images=image, return_tensors="pt")
        ids = whole["input_ids"][0]
        assert torch.equal(ids[:len(ctx)], ctx)
        logits = model(**whole).logits[0].float().log_softmax(-1)
        target = ids[len(ctx):]
        pred = logits[len(ctx) - 1:len(ids) - 1]
        want = float(pred.gather(-1, target[:, None]).sum())
        assert logp == pytest.approx(want, abs=1e-3, rel=1e-4)
        assert greedy == bool((pred.argmax(-1) == target).all())
    if not lm.engine.model.hybrid_config.mamba_layers:             # the trained teacher: truth is its greedy answer
        assert all(g for _, g in got[:5]) and not got[5][1]
        assert got[5][0] < got[0][0] - 5


@needs_lmms
@torch.no_grad()
def test_loglikelihood_runs_attention_without_cudnn(lm, data, sdpa_spy):
    """Each batch of continuations is a new length: cuDNN's per-shape graph builds are kept out
    (ops.attention.sdpa_without_cudnn), the vision tower's attention included."""
    docs = data[1][:2]
    reqs = [instance("loglikelihood", (d["question"], " " + d["answer"], doc_to_visual, r, TASK, SPLIT), r)
            for r, d in enumerate(docs)]
    lm.loglikelihood(reqs)
    assert sdpa_spy.seen and not any(sdpa_spy.seen)


@needs_lmms
@torch.no_grad()
def test_a_text_model_answers_and_scores_without_images(tmp_path):
    from matvlm.eval.lmms import MatvlmLMM
    from matvlm.toy.tiny import save_teacher, tiny_causal_lm

    model, tok = tiny_causal_lm("llama", n_layer=2, kv_heads=2, seed=3)
    lm = MatvlmLMM(pretrained=str(save_teacher(model, tok, tmp_path / "causal")), batch_size=2, device="cpu")
    docs = [{"q": "what color is the square?"}, {"q": "how many objects"}]
    lm.task_dict = {TASK: {SPLIT: docs}}
    gen = [instance("generate_until", (d["q"], {"max_new_tokens": 3}, lambda doc: [], i, TASK, SPLIT), i)
           for i, d in enumerate(docs)]
    want = answer_batch(lm.model, lm.engine.processor, [d["q"] for d in docs], [None, None], TEMPLATE,
                        max_new_tokens=3)
    assert lm.generate_until(gen) == want
    # 2-tuple arguments are lmms-eval's unconditional (mutual-information) requests: no visuals
    reqs = [instance("loglikelihood", (docs[0]["q"], " red", None, 0, TASK, SPLIT), 0),
            instance("loglikelihood", (docs[1]["q"], " 3 objects", None, 1, TASK, SPLIT), 1),
            instance("loglikelihood", ("", "red"), 0)]
    from matvlm.inputs.prompts import render

    for (logp, greedy), r in zip(lm.loglikelihood(reqs), reqs):
        prompt = render(lm.engine.processor, lm.model.config, [{"role": "user", "content": r.args[0]}], 0)
        ctx = lm.tokenizer(prompt)["input_ids"]
        ids = torch.tensor([lm.tokenizer(prompt + r.args[1])["input_ids"]])
        pred = lm.model(input_ids=ids).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)
        target = ids[0, len(ctx):]
        assert logp == pytest.approx(float(pred.gather(-1, target[:, None]).sum()), abs=1e-3, rel=1e-4)
        assert greedy == bool((pred.argmax(-1) == target).all())


@needs_lmms
def test_python_m_lmms_eval_end_to_end_on_a_local_task(tmp_path, data, student_dir):
    """`python -m lmms_eval --model matvlm` on a task written here (local JSON lines, offline), for the hybrid."""
    root, docs = data
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shapes_tiny.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'test.jsonl'}
test_split: test
output_type: generate_until
doc_to_visual: !function shapes_tiny_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 48
  temperature: 0
  until: [","]
process_results: !function shapes_tiny_utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
""")
    (tasks / "shapes_tiny_utils.py").write_text(
        "from PIL import Image\n\n\ndef doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n\n\n"
        "def process_results(doc, results):\n"
        "    return {'accuracy': float(results[0].strip().lower() == doc['answer'].strip().lower())}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "matvlm", "--model_args",
           f"pretrained={student_dir},device=cpu", "--tasks", TASK, "--include_path", str(tasks),
           "--output_path", str(out), "--batch_size", "8", "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from matvlm import load, load_processor

    model, processor = load(student_dir), load_processor(student_dir)
    want = [cut(a, [","]) for a in answer_batch(model, processor, [d["question"] for d in docs],
                                                [d["image"] for d in docs], TEMPLATE, max_new_tokens=48)]
    expected = sum(w.lower() == d["answer"].lower() for w, d in zip(want, docs)) / len(docs)
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    assert results["results"][TASK]["accuracy,none"] == pytest.approx(expected)
    samples = [json.loads(line) for line in next(out.rglob(f"*_samples_{TASK}.jsonl")).read_text().splitlines()]
    got = {s["doc_id"]: s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
           for s in samples}
    assert [got[i] for i in range(len(docs))] == want
