"""The runner: resumes a killed run without recomputing, handles bad items and unknown tasks by policy,
and runs the real predictor on a tiny model end to end (proxy task, likelihoods, generation, CLI, report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm.checkpoint import MediaConfig, ModelConfig, build_model, save_checkpoint
from mllm.cli import main
from mllm.data.records import BadRecordError
from mllm.eval.predictor import ModelPredictor
from mllm.eval.runner import OutputFolderError, RunMismatchError, TaskListError, UnknownTaskError, resolve_tasks, run_eval
from mllm.eval.tasks import TaskSpec, build_task
from mllm.media import Image, MediaError, Video, load_image, load_video, save_image, save_video
from tests.conftest import TINY_LMS


class CountingPredictor:
    """Answers "7" to everything and records which items it was asked; can die at a given call."""

    def __init__(self, die_at_call: int | None = None, bad_ids: tuple[str, ...] = ()):
        self.asked: list[str] = []
        self.calls = 0
        self.die_at_call, self.bad_ids = die_at_call, bad_ids

    def answer(self, items, max_new_tokens):
        self.calls += 1
        if self.calls == self.die_at_call:
            raise KeyboardInterrupt  # the process is killed mid-run
        for item in items:
            if item.id in self.bad_ids:
                raise MediaError(f"{item.id}.png", "corrupt or truncated image")
        self.asked += [i.id for i in items]
        return ["7" for _ in items]

    def choice_logprobs(self, items):
        return [[-float(k) for k in range(len(i.choices))] for i in items]

    def generate_media(self, items, modality):
        return [Image(np.full((28, 28, 3), 255, np.uint8)) for _ in items]


def jsonl_task(tmp_path: Path, n: int = 10, name: str = "mine", **options):
    file = tmp_path / f"{name}.jsonl"
    file.write_text("".join(json.dumps({"id": f"q{k}", "question": f"q {k}?", "answer": str(k % 8)}) + "\n" for k in range(n)))
    return build_task(TaskSpec("jsonl", str(file), name=name, options=options))


def test_a_killed_run_resumes_without_recomputing_finished_items(tmp_path):
    task, out = jsonl_task(tmp_path), tmp_path / "out"
    first = CountingPredictor(die_at_call=3)
    with pytest.raises(KeyboardInterrupt):
        run_eval([task], first, out, model="m", batch_size=3, progress=False)
    assert first.asked == [f"q{k}" for k in range(6)]  # two batches finished before the kill
    with open(out / "cache" / "mine.jsonl", "a") as f:
        f.write('{"id": "q6", "te')  # a line the kill cut short
    second = CountingPredictor()
    results = run_eval([task], second, out, model="m", batch_size=3, progress=False)
    assert second.asked == [f"q{k}" for k in range(6, 10)]
    assert results["mine"] == {"accuracy": 0.1, "n": 10, "proxy": False}  # "7" is right for q7 only
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"q{k}" for k in range(10)] and lines[7] == {
        "task": "mine", "id": "q7", "prediction": "7", "answer": "7", "score": 1.0}
    third = CountingPredictor()
    run_eval([task], third, out, model="m", batch_size=3, progress=False)
    assert third.asked == []


def test_a_cache_of_another_model_is_refused(tmp_path):
    task, out = jsonl_task(tmp_path, n=2), tmp_path / "out"
    run_eval([task], CountingPredictor(), out, model="a", progress=False, report=False)
    with pytest.raises(RunMismatchError, match="holds results of model a"):
        run_eval([task], CountingPredictor(), out, model="b", progress=False, report=False)
    fresh = CountingPredictor()
    run_eval([task], fresh, out, model="b", overwrite=True, progress=False, report=False)
    assert fresh.asked == ["q0", "q1"]


class NoisyPredictor(CountingPredictor):
    """Answers with a random draw, as a sampled medium or a de-tokenizer's noise would come out."""

    def answer(self, items, max_new_tokens):
        return [f"{torch.rand(()).item():.6f}" for _ in items]


def test_a_batch_draws_the_same_numbers_whatever_ran_before_it(tmp_path):
    a, b = jsonl_task(tmp_path, n=4, name="a"), jsonl_task(tmp_path, n=4, name="b")
    alone = run_eval([b], NoisyPredictor(), tmp_path / "alone", model="m", batch_size=2, progress=False, report=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    after_a = run_eval([a, b], NoisyPredictor(), tmp_path / "after", model="m", batch_size=2, progress=False, report=False)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched

    def replies(out, task):
        return [json.loads(x)["text"] for x in (out / "cache" / f"{task}.jsonl").read_text().splitlines()]

    assert replies(tmp_path / "alone", "b") == replies(tmp_path / "after", "b")
    assert len(set(replies(tmp_path / "after", "a") + replies(tmp_path / "after", "b"))) == 8  # not one fixed draw
    assert alone["b"] == after_a["b"]


def test_a_run_that_fails_while_writing_its_predictions_leaves_the_last_ones_whole(tmp_path):
    task, out = jsonl_task(tmp_path, n=4), tmp_path / "out"
    run_eval([task], CountingPredictor(), out, model="m", progress=False)
    before = {name: (out / name).read_text() for name in ("predictions.jsonl", "report.md", "report.html")}
    task.items[2].answer = {"7"}  # matches like a list of answers, but a set is no JSON: the write fails there
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        run_eval([task], CountingPredictor(), out, model="m", overwrite=True, progress=False)
    assert {name: (out / name).read_text() for name in before} == before
    assert not list(out.glob(".*tmp*"))


def test_an_item_that_fails_to_load_stops_the_run_or_is_skipped(tmp_path):
    task = jsonl_task(tmp_path, n=6)
    with pytest.raises(BadRecordError, match="mine:q4: corrupt_media: q4.png"):
        run_eval([task], CountingPredictor(bad_ids=("q4",)), tmp_path / "a", model="m", batch_size=4, progress=False)
    predictor = CountingPredictor(bad_ids=("q4",))
    results = run_eval([task], predictor, tmp_path / "b", model="m", batch_size=4, policy="skip", progress=False)
    assert results["mine"]["n"] == 5 and results["mine"]["skipped"] == 1
    assert "q4" not in predictor.asked and "q5" in predictor.asked  # the rest of the bad batch still ran
    for report in ("report.md", "report.html"):  # which item, and why, outlives the log
        assert "mine:q4: corrupt_media: q4.png: corrupt or truncated image" in (tmp_path / "b" / report).read_text()


def test_an_unknown_task_name_fails_listing_the_known_ones_or_is_skipped(tmp_path):
    with pytest.raises(UnknownTaskError, match="unknown task 'popee'.*pope_proxy"):
        resolve_tasks(["popee"], corpora=tmp_path)
    assert resolve_tasks(["popee"], corpora=tmp_path, policy="skip") == []


def test_a_task_list_that_makes_no_run_is_refused_naming_why(tmp_path, capsys):
    with pytest.raises(TaskListError, match="task 'popee' is listed twice"):
        resolve_tasks(["popee", "popee"], corpora=tmp_path)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mine.jsonl").write_text('{"id": "q", "question": "q?", "answer": "7"}\n')
    with pytest.raises(TaskListError, match="two tasks are named 'mine'.*a/mine.jsonl and .*b/mine.jsonl"):
        resolve_tasks([str(tmp_path / "a" / "mine.jsonl"), str(tmp_path / "b" / "mine.jsonl")], corpora=tmp_path)
    eval_ = ["eval", "--model", str(tmp_path), "--out", str(tmp_path / "out")]
    for extra, why in ((["--tasks", "pope_proxy", "pope_proxy"], "task 'pope_proxy' is listed twice"),
                       (["--tasks", "nope", "--on-bad", "skip"], "no task to run: of those named ('nope'), every one was unknown")):
        assert main([*eval_, *extra]) == 2
        assert capsys.readouterr().err.startswith(f"mllm eval: {why}")


def test_an_output_folder_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    for out in (file, file / "run"):
        assert main(["eval", "--model", str(tmp_path), "--tasks", "nope", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"mllm eval: cannot make the output folder {out}: {file} is a file"
    with pytest.raises(OutputFolderError, match="is a file"):
        run_eval([jsonl_task(tmp_path, n=1)], CountingPredictor(), file, model="m", overwrite=True, progress=False)


@pytest.mark.parametrize("device, why", [("bogus", "expected a torch device such as cpu, cuda or cuda:1, got 'bogus'"),
                                         ("cuda", "'cuda': torch sees no CUDA device here")])
def test_a_device_this_machine_lacks_is_refused_by_the_command_line(tmp_path, capsys, monkeypatch, device, why):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["eval", "--tasks", "nope", "--out", str(tmp_path)], ["chat"], ["serve"]):
        with pytest.raises(SystemExit) as exit:
            main([*command, "--device", device])
        assert exit.value.code == 2 and why in capsys.readouterr().err


# ---- the real predictor on a tiny model --------------------------------------------------------------------


def tiny_corpora(root: Path, n: int = 4) -> Path:
    """A digits corpus in the built layout: test images with yes/no questions."""
    records = []
    for k in range(n):
        save_image(Image(np.random.default_rng(k).integers(0, 255, (28, 28, 3), dtype=np.uint8)), root / "digits" / "media" / f"{k}.png")
        records.append({"id": f"digits-test-{k}", "corpus": "digits", "task": "image_qa",
                        "messages": [{"role": "user", "content": [{"type": "image", "path": f"media/{k}.png"},
                                                                  {"type": "text", "text": f"Is this a {k}?"}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
                        "meta": {"label": k, "question": f"Is this a {k}?", "answer": "yes", "question_type": "yes_no"}})
    (root / "digits" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def tiny_model(mistral_tokenizer_dir):
    return build_model(ModelConfig(base_config=TINY_LMS["llama"], tokenizer=str(mistral_tokenizer_dir),
                                   media={"image": MediaConfig(tokenizer="patch", options={"image_size": 8, "patch_size": 4})}))


def test_batched_likelihoods_equal_one_at_a_time(tiny_model):
    predictor = ModelPredictor(*tiny_model, rows_per_forward=3)
    conversations = [[{"role": "user", "content": "Which digit?"}], [{"role": "user", "content": "Say a long word, please."}],
                     [{"role": "user", "content": "Hi"}]]
    replies = ["7", "antidisestablishmentarianism", "hello there"]
    together = predictor.reply_logprobs(conversations, replies)
    alone = [predictor.reply_logprobs([c], [r])[0] for c, r in zip(conversations, replies)]
    assert [s for s, _ in together] == pytest.approx([s for s, _ in alone], abs=1e-4)
    assert all(s < 0 for s, _ in together)


class TranscribingPredictor(CountingPredictor):
    """Answers "7"; transcribes every recording as "one two"."""

    def transcribe(self, items, max_new_tokens):
        return ["one two" for _ in items]


def test_a_transcription_task_is_transcribed_and_a_model_that_spells_nothing_transcribes_greedily(tmp_path, tiny_model):
    from mllm.media import Audio, save_audio

    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1" / "1"
    save_audio(Audio(np.zeros((1, 1600), np.float32), 16000), chapter / "1-1-0000.flac")
    (chapter / "1-1.trans.txt").write_text("1-1-0000 ONE TWO\n")
    task = build_task(TaskSpec("librispeech", str(tmp_path / "LibriSpeech"), name="ls"))
    assert task.mode == "transcribe"
    results = run_eval([task], TranscribingPredictor(), tmp_path / "out", model="m", progress=False, report=False)
    assert results["ls"]["wer"] == 0.0
    predictor = ModelPredictor(*tiny_model)  # trained to spell nothing: `config.transcribed` is empty
    items = [type(task.items[0])("q", "Which digit?", "7")]
    assert predictor.transcribe(items, max_new_tokens=4) == predictor.answer(items, max_new_tokens=4)
    with pytest.raises(ValueError, match="ctc_weight"):
        ModelPredictor(*tiny_model, ctc_weight=1.5)


def judge_white_is_seven(paths: list[str]) -> list[str]:
    """A stand-in judge: a white picture "shows" a 7; no file ("") shows nothing."""
    return ["" if not p else "7" if load_image(p).pixels.mean() > 250 else "?" for p in paths]


def test_generation_writes_one_file_per_item_and_the_judge_scores_them(tmp_path):
    file = tmp_path / "draw.jsonl"
    file.write_text("".join(json.dumps({"id": f"g{k}", "prompt": f"Draw a {t}.", "target": t}) + "\n" for k, t in enumerate("773")))
    task = build_task(TaskSpec("jsonl", str(file), name="draw",
                               options={"generate": "image", "judge": "tests.test_eval_runner:judge_white_is_seven"}))
    results = run_eval([task], CountingPredictor(), tmp_path / "out", model="m", progress=False)
    assert results["draw"]["judge_accuracy"] == pytest.approx(2 / 3)
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [x["files"] for x in lines] == [[f"media/draw/g{k}.png"] for k in range(3)]
    assert [x["judged"] for x in lines] == ["7", "7", "7"] and [x["score"] for x in lines] == [1.0, 1.0, 0.0]
    assert "the judge read" in (tmp_path / "out" / "report.md").read_text()
    assert all((tmp_path / "out" / x["files"][0]).is_file() for x in lines)


class ForgetfulPainter(CountingPredictor):
    """Writes no picture for g1, as a model whose medium max_new_tokens cut writes none."""

    def generate_media(self, items, modality):
        return [None if i.id == "g1" else Image(np.full((28, 28, 3), 255, np.uint8)) for i in items]


def test_an_item_the_model_wrote_no_medium_for_is_scored_wrong_and_the_run_goes_on(tmp_path):
    file = tmp_path / "draw.jsonl"
    file.write_text("".join(json.dumps({"id": f"g{k}", "prompt": f"Draw a {t}.", "target": t}) + "\n" for k, t in enumerate("777")))
    task = build_task(TaskSpec("jsonl", str(file), name="draw",
                               options={"generate": "image", "judge": "tests.test_eval_runner:judge_white_is_seven"}))
    results = run_eval([task], ForgetfulPainter(), tmp_path / "out", model="m", batch_size=3, progress=False)
    assert results["draw"]["judge_accuracy"] == pytest.approx(2 / 3) and results["draw"]["n"] == 3
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [x.get("files") for x in lines] == [["media/draw/g0.png"], None, ["media/draw/g2.png"]]
    assert [x["score"] for x in lines] == [1.0, 0.0, 1.0]


def test_mllm_eval_runs_a_proxy_and_a_choice_task_on_a_real_checkpoint(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    corpora = tiny_corpora(tmp_path / "corpora")
    checkpoint = save_checkpoint(*tiny_model, tmp_path / "ckpt")
    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps({"id": f"c{k}", "media": [{"type": "image", "path": f"corpora/digits/media/{k}.png"}],
                                           "question": "Which digit?", "answer": str(k), "choices": ["0", "1", "2", "3"]}) + "\n"
                               for k in range(4)))
    out = tmp_path / "out"
    argv = ["eval", "--model", str(checkpoint), "--tasks", "pope_proxy", str(choices), "--data", str(corpora),
            "--out", str(out), "--limit", "6", "--batch-size", "4"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pope_proxy"]["proxy"] is True and results["pope_proxy"]["n"] == 6
    assert set(results["pope_proxy"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "categories"}
    assert results["choices"]["n"] == 4 and 0 <= results["choices"]["likelihood_accuracy"] <= 1
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and all("likelihood_choice" in x for x in lines if x["task"] == "choices")
    html = (out / "report.html").read_text()
    assert "pope_proxy" in html and "proxy" in html and "<img" in html
    assert "| pope_proxy | proxy | 6 |" in (out / "report.md").read_text()
    cached = (out / "cache" / "pope_proxy.jsonl").read_text()
    assert main(argv) == 0 and (out / "cache" / "pope_proxy.jsonl").read_text() == cached  # all resumed from the cache
    assert torch.is_grad_enabled()


# ---- the lmms-eval plugin ------------------------------------------------------------------------------------

STUB_YAML = """\
task: mllm_stub
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function stub_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
STUB_UTILS = """\
import PIL.Image


def doc_to_visual(doc):
    return [PIL.Image.open(doc["image"]).convert("RGB")]
"""


def write_lmms_eval_stub(root: Path, corpora: Path) -> Path:
    """A task in lmms-eval's own YAML format over local JSON lines."""
    tasks = root / "lmms_tasks"
    tasks.mkdir(parents=True)
    data = tasks / "stub.jsonl"
    data.write_text("".join(json.dumps({"question": "Which digit is this?", "answer": str(k),
                                        "image": str(corpora / "digits" / "media" / f"{k}.png")}) + "\n" for k in range(4)))
    (tasks / "mllm_stub.yaml").write_text(STUB_YAML.format(data=data))
    (tasks / "stub_utils.py").write_text(STUB_UTILS)
    return tasks


def entry_point_dist(root: Path) -> Path:
    """A distribution declaring the plugin's entry point, as the installed mllm package does."""
    dist = root / "dist" / "mllm_lmms_eval_plugin-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mllm-lmms-eval-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nmllm = mllm.eval.lmms_eval_plugin:manifest\n")
    return dist.parent


@pytest.mark.slow  # about 45 s: lmms-eval starts in a subprocess
def test_lmms_eval_runs_a_stub_task_against_an_mllm_checkpoint(tmp_path, tiny_model):
    """The plugin found through its entry point, end to end on a generate_until task; its loglikelihood,
    called as lmms-eval calls it, ranks options the way lmms-eval's multiple_choice reads them (lowest wins)."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    import os
    import subprocess
    import sys

    from lmms_eval.api.instance import Instance

    from mllm.eval.lmms_eval_plugin import MllmModel

    corpora = tiny_corpora(tmp_path / "corpora")
    tasks = write_lmms_eval_stub(tmp_path, corpora)
    checkpoint = save_checkpoint(*tiny_model, tmp_path / "ckpt")
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(entry_point_dist(tmp_path)), str(root)]),
                        "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "mllm", "--model_args", f"pretrained={checkpoint}",
                          "--tasks", "mllm_stub", "--include_path", str(tasks), "--batch_size", "2",
                          "--output_path", str(tmp_path / "lmms_out")], capture_output=True, text=True, env=env, timeout=600)
    results = list((tmp_path / "lmms_out").rglob("*results.json"))
    assert run.returncode == 0 and results, run.stdout[-3000:] + run.stderr[-3000:]
    assert 0 <= json.loads(results[0].read_text())["results"]["mllm_stub"]["exact_match,none"] <= 1

    lm = MllmModel(pretrained=str(checkpoint), batch_size=2)
    lm.task_dict = {"stub": {"test": [{}]}}
    requests = [Instance("loglikelihood", ("Which digit?", f" {k}", lambda d: [], 0, "stub", "test"), idx=k,
                         metadata={"task": "stub", "doc_id": 0, "repeats": 1}) for k in range(3)]
    nll = [v for v, _ in lm.loglikelihood(requests)]
    logprobs = lm.predictor.reply_logprobs([[{"role": "user", "content": "Which digit?"}]] * 3, ["0", "1", "2"])
    assert nll == pytest.approx([-lp for lp, _ in logprobs], abs=1e-4) and all(v > 0 for v in nll)


def test_the_paper_proxy_asks_the_digit_questions_of_each_digit_redrawn_in_a_real_pen(tmp_path):
    from mllm.eval.proxies import PENS_ON_PAPER, build_proxy, write_vqav2

    corpora = tiny_corpora(tmp_path / "corpora", n=6)
    strokes = np.zeros((28, 28, 3), dtype=np.uint8)
    strokes[6:22, 12:16] = 255  # a white "1" on black, as the corpus writes digits
    for k in range(6):
        save_image(Image(strokes), corpora / "digits" / "media" / f"{k}.png")
    spec = build_proxy("vqav2_paper_proxy", corpora, tmp_path / "proxies")
    root = Path(spec.path)
    write_vqav2(corpora, tmp_path / "plain", ("digits",))  # vqav2_proxy's digit half
    for name in ("questions.json", "annotations.json"):
        assert (root / name).read_text() == (tmp_path / "plain" / name).read_text()
    for k in range(6):
        pixels = load_image(root / "images" / f"{k:06d}.png").pixels / 255
        ink, paper = (np.array(c) for c in PENS_ON_PAPER[k % len(PENS_ON_PAPER)])
        assert np.abs(pixels[10, 13] - ink).max() < 0.01 and np.abs(pixels[0, 0] - paper).max() < 0.01


def test_the_off_centre_proxy_shrinks_each_penned_digit_and_moves_it_somewhere_of_its_own(tmp_path):
    from mllm.eval.proxies import OFF_CENTRE, PENS_ON_PAPER, build_proxy, write_vqav2

    corpora = tiny_corpora(tmp_path / "corpora", n=6)
    square = np.zeros((28, 28, 3), dtype=np.uint8)
    square[4:24, 4:24] = 255  # a white 20-pixel square on black, centred
    for k in range(6):
        save_image(Image(square), corpora / "digits" / "media" / f"{k}.png")
    root = Path(build_proxy("vqav2_offcentre_proxy", corpora, tmp_path / "proxies").path)
    write_vqav2(corpora, tmp_path / "plain", ("digits",))
    for name in ("questions.json", "annotations.json"):
        assert (root / name).read_text() == (tmp_path / "plain" / name).read_text()
    corners = set()
    for k in range(6):
        pixels = load_image(root / "images" / f"{k:06d}.png").pixels / 255  # [28, 28, 3]
        ink, paper = (np.array(c) for c in PENS_ON_PAPER[k % len(PENS_ON_PAPER)])
        inked = np.argwhere(np.abs(pixels - ink).max(2) < 0.05)  # [n, 2]: the square's pixels
        side = inked.max(0) - inked.min(0) + 1
        on_paper = (np.abs(pixels - paper).max(2) < 0.01).sum()
        assert (np.abs(side - OFF_CENTRE * 20) <= 2).all() and on_paper >= 28 ** 2 - (OFF_CENTRE * 20 + 4) ** 2
        corners.add(tuple(inked.min(0)))
    assert len(corners) >= 4  # each image at a place of its own


def moving_block_corpora(root: Path, clips: int) -> Path:
    """Corpora whose video test split is `clips` copies of a white 16x8 block moving right on black (4 frames of
    32²), each asked which way it moves."""
    question = "Which way does the digit move? Answer left, right, up or down."
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    for t in range(4):
        frames[t, 8:24, 4 + 4 * t:12 + 4 * t] = 255
    records = []
    for k in range(clips):
        save_video(Video(frames, 8.0), root / "video" / "media" / f"{k}.mp4")
        records.append({"id": f"video-test-{k}", "corpus": "video", "task": "video_qa",
                        "messages": [{"role": "user", "content": [{"type": "video", "path": f"media/{k}.mp4"},
                                                                  {"type": "text", "text": question}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "right"}]}],
                        "meta": {"question": question, "answer": "right", "question_type": "direction"}})
    (root / "video" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_the_video_paper_proxy_redraws_every_frame_of_each_clip_in_a_real_pen(tmp_path):
    from mllm.eval.proxies import PENS_ON_PAPER, build_proxy

    corpora = moving_block_corpora(tmp_path / "corpora", clips=3)
    root = Path(build_proxy("videoqa_paper_proxy", corpora, tmp_path / "proxies").path)
    plain = Path(build_proxy("videoqa_proxy", corpora, tmp_path / "proxies").path)
    assert (root / "test_qa.json").read_text() == (plain / "test_qa.json").read_text()
    for k in range(3):
        clip = load_video(root / "video" / f"video{k}.mp4").frames / 255  # [4, 32, 32, 3]
        ink, paper = (np.array(c) for c in PENS_ON_PAPER[k % len(PENS_ON_PAPER)])
        assert clip.shape == (4, 32, 32, 3)
        assert np.abs(clip[:, 0, 0] - paper).max() < 0.05  # H.264 keeps flat colours nearly exact
        assert all(np.abs(clip[t, 16, 8 + 4 * t] - ink).max() < 0.15 for t in range(4))  # the ink moves with the block


def test_the_off_centre_video_proxy_shrinks_each_penned_clip_and_moves_every_frame_alike(tmp_path):
    from mllm.eval.proxies import OFF_CENTRE, PENS_ON_PAPER, build_proxy

    corpora = moving_block_corpora(tmp_path / "corpora", clips=5)
    root = Path(build_proxy("videoqa_offcentre_proxy", corpora, tmp_path / "proxies").path)
    plain = Path(build_proxy("videoqa_proxy", corpora, tmp_path / "proxies").path)
    assert (root / "test_qa.json").read_text() == (plain / "test_qa.json").read_text()
    corners = set()
    for k in range(5):
        clip = load_video(root / "video" / f"video{k}.mp4").frames / 255  # [4, 32, 32, 3]
        ink = np.array(PENS_ON_PAPER[k % len(PENS_ON_PAPER)][0])
        inked = [np.argwhere(np.abs(clip[t] - ink).max(2) < 0.15) for t in range(4)]  # [n, 2] per frame
        heights = [a[:, 0].max() - a[:, 0].min() + 1 for a in inked]
        assert all(abs(h - OFF_CENTRE * 16) <= 2 for h in heights)  # the block shrinks with its frame
        assert len({a[:, 0].min() for a in inked}) == 1  # every frame moved alike: the block's rows stay put
        assert inked[3][:, 1].min() > inked[0][:, 1].min()  # and it still moves right
        corners.add(tuple(inked[0].min(0)))
    assert len(corners) >= 3  # each clip at a place of its own
