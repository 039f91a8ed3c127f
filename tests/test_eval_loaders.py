"""Each benchmark reader on a tiny fixture written in its native format; bad items fail or are skipped."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mllm.config import ConfigError
from mllm.data.records import BadRecordError
from mllm.eval.tasks import MediaRef, Prediction, TaskSpec, build_task, load_task_spec
from mllm.media import Audio, Image, MediaError, Video, save_audio, save_image, save_video


def png(path: Path, value: int = 128) -> Path:
    return save_image(Image(np.full((8, 8, 3), value, np.uint8)), path)


def wav(path: Path) -> Path:
    return save_audio(Audio(np.zeros((1, 1600), np.float32), 16000), path)


def mp4(path: Path, frames: int = 8) -> Path:
    return save_video(Video(np.zeros((frames, 16, 16, 3), np.uint8), fps=4.0), path)


def task_of(loader: str, path: Path, policy: str = "fail", **options):
    return build_task(TaskSpec(loader, str(path), name=loader, options=options), policy)


def preds(task, texts):
    return [Prediction(i.id, text=t) for i, t in zip(task.items, texts)]


def test_mme_both_layouts_and_acc_plus(tmp_path):
    png(tmp_path / "existence" / "1.png")
    (tmp_path / "existence" / "1.txt").write_text("Is there a dog?\tYes\nIs there a cat?\tNo\n")
    png(tmp_path / "artwork" / "images" / "7.jpg")
    (tmp_path / "artwork" / "questions_answers_YN" / "7.txt").parent.mkdir(parents=True)
    (tmp_path / "artwork" / "questions_answers_YN" / "7.txt").write_text("Is it by Monet?\tNo\nIs it by Manet?\tYes\n")
    task = task_of("mme", tmp_path)
    assert [i.id for i in task.items] == ["artwork/7/1", "artwork/7/2", "existence/1/1", "existence/1/2"]
    scores = task.score(task.items, preds(task, ["No.", "No", "Yes, there is", "no"]))
    assert scores.categories["artwork"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0, "n": 2}
    assert scores.metrics["perception_score"] == 250.0  # artwork 50 + existence 200


def mmbench_tsv(path: Path, rows: list[dict]) -> Path:
    image = base64.b64encode(png(path.parent / "img.png").read_bytes()).decode()
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({"hint": "nan", "D": "", "category": "demo", "image": image} | row)
    return path


def test_mmbench_makes_rotations_and_scores_circular_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    tsv = mmbench_tsv(tmp_path / "dev.tsv", [
        {"index": 0, "question": "Which animal?", "A": "cat", "B": "dog", "C": "bird", "answer": "B"},
        {"index": 1, "question": "Which colour?", "A": "red", "B": "blue", "answer": "A"},
    ])
    task = task_of("mmbench", tsv)
    assert [i.id for i in task.items] == ["0", "1000000", "2000000", "1", "1000001"]
    assert [i.answer for i in task.items] == ["B", "A", "C", "A", "B"]  # "dog" rotated to the front, then to the back
    assert task.items[1].choices == ["dog", "bird", "cat"] and "A. dog" in task.items[1].question
    # question 0 right in every rotation; question 1 wrong in its second
    scores = task.score(task.items, preds(task, ["B", "A.", "(C)", "A", "A"]))
    assert scores.metrics["circular_accuracy"] == 0.5 and scores.metrics["accuracy"] == 1.0
    by_likelihood = task.score(task.items, [Prediction(i.id, choice=["A", "B", "C"].index(i.answer)) for i in task.items])
    assert by_likelihood.metrics["circular_accuracy"] == 1.0


def test_mmbench_uses_rotations_the_tsv_already_has(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    tsv = mmbench_tsv(tmp_path / "dev.tsv", [
        {"index": 5, "question": "Q", "A": "x", "B": "y", "answer": "A"},
        {"index": 1000005, "question": "Q", "A": "y", "B": "x", "answer": "B"},
    ])
    task = task_of("mmbench", tsv)
    assert [i.id for i in task.items] == ["5", "1000005"]
    assert task.score(task.items, preds(task, ["A", "A"])).metrics["circular_accuracy"] == 0.0


def test_mmbench_scores_only_questions_with_every_rotation_answered(tmp_path, monkeypatch):
    """A limit cuts question 1 after its first rotation; --on-bad skip drops a rotation row of the TSV's own: neither
    is a CircularEval question, only counted. Question 0 is wrong in one rotation."""
    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    made = task_of("mmbench", mmbench_tsv(tmp_path / "made.tsv", [
        {"index": 0, "question": "Which animal?", "A": "cat", "B": "dog", "C": "bird", "answer": "B"},
        {"index": 1, "question": "Which colour?", "A": "red", "B": "blue", "answer": "A"},
    ]))
    first_four = made.items[:4]  # as --limit 4 leaves them
    scores = made.score(first_four, [Prediction(i.id, text=t) for i, t in zip(first_four, ["B", "B", "C", "A"])])
    assert scores.metrics == {"circular_accuracy": 0.0, "questions": 1, "incomplete_questions": 1, "accuracy": 1.0, "n": 4}
    assert scores.categories["demo"] == {"circular_accuracy": 0.0, "questions": 1, "incomplete_questions": 1}
    held = task_of("mmbench", mmbench_tsv(tmp_path / "held.tsv", [
        {"index": 5, "question": "Q", "A": "x", "B": "y", "answer": "A"},
        {"index": 1000005, "question": "Q", "A": "y", "B": "x", "answer": "Z"},  # a bad row
    ]), policy="skip")
    scores = held.score(held.items, preds(held, ["A"]))
    assert scores.metrics["circular_accuracy"].startswith("skipped: no question") and scores.metrics["incomplete_questions"] == 1
    later = task_of("mmbench", mmbench_tsv(tmp_path / "later.tsv", [  # only a second rotation: no first-pass accuracy
        {"index": 1000005, "question": "Q", "A": "y", "B": "x", "answer": "B"}]))
    scores = later.score(later.items, preds(later, ["B"]))  # was a ZeroDivisionError
    assert scores.metrics["accuracy"] == "skipped: no question answered in its first rotation"


def test_seed_images_videos_segments_and_frame_folders(tmp_path):
    png(tmp_path / "SEED-Bench-image" / "1_2.jpg")
    mp4(tmp_path / "SEED-Bench-video" / "clip.mp4", frames=8)  # 2 s at 4 fps
    for k in range(3):
        png(tmp_path / "SEED-Bench-video" / "frames" / f"{k}.png", value=40 * k)
    base = {"choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four", "question": "How many?"}
    questions = [
        base | {"question_id": "101", "data_type": "image", "data_id": "1_2.jpg", "question_type_id": 5, "answer": "B"},
        base | {"question_id": "102", "data_type": "video", "data_id": "clip.mp4", "question_type_id": 10,
                "answer": "C", "segment": [0.5, 1.0]},
        base | {"question_id": "103", "data_type": "video", "data_id": "frames", "question_type_id": 12, "answer": "A"},
    ]
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({"question_type": {"Instance Counting": 5, "Action Recognition": 10},
                                                          "questions": questions}))
    task = task_of("seed", tmp_path)
    assert task.mode == "both" and [i.category for i in task.items] == ["Instance Counting", "Action Recognition", "12"]
    assert task.items[1].media[0].load_video().num_frames == 3  # frames 2..4 of 0.5-1.0 s at 4 fps
    assert task.items[2].media[0].load_video().num_frames == 3
    scores = task.score(task.items, preds(task, ["B", "A", "A"]))
    assert scores.metrics["image_accuracy"] == 1.0 and scores.metrics["video_accuracy"] == 0.5
    assert task_of("seed", tmp_path, data_types=["image"]).items[0].id == "101"


@pytest.mark.parametrize("segment", [["start", 1.0], [0.5], 7, [True, 1.0], [0.5, 1.0, 2.0]])
def test_a_seed_segment_that_is_not_two_numbers_is_a_bad_record_naming_it(tmp_path, segment):
    # float("start") was a bare ValueError that ended the whole load; a number was a TypeError
    mp4(tmp_path / "SEED-Bench-video" / "clip.mp4")
    question = {"question_id": "7", "data_type": "video", "data_id": "clip.mp4", "question_type_id": 10, "answer": "A",
                "question": "Q", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "segment": segment}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({"questions": [question]}))
    with pytest.raises(BadRecordError, match=r"segment must be \[start, end\] in seconds"):
        task_of("seed", tmp_path)
    question["segment"] = ["0.5", "1.0"]  # numbers written as text still read
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({"questions": [question]}))
    assert task_of("seed", tmp_path).items[0].media[0].load_video().num_frames == 3


@pytest.mark.parametrize("segment", [(1.5, 0.5), (-1.0, 1.0), (float("nan"), 1.0), (0.0, float("inf"))])
def test_a_segment_that_is_no_span_of_the_video_is_a_bad_medium_naming_it(tmp_path, segment):
    """A bad item, which the runner skips or fails on by policy: it was one frame (1.5-0.5 s), a "past the end"
    error (-1 s), or a ValueError or OverflowError (NaN, inf) that stopped the whole run."""
    ref = MediaRef("video", str(mp4(tmp_path / "clip.mp4")), segment)
    with pytest.raises(MediaError, match=r"clip.mp4: .*segment .* is no span of a video"):
        ref.load_video()


def test_pope_reads_each_setting(tmp_path):
    png(tmp_path / "val2014" / "a.jpg")
    for setting, label in (("random", "yes"), ("adversarial", "no")):
        row = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": label}
        (tmp_path / f"coco_pope_{setting}.json").write_text(json.dumps(row) + "\n")
    task = task_of("pope", tmp_path)
    assert [i.id for i in task.items] == ["adversarial/1", "random/1"]
    scores = task.score(task.items, preds(task, ["Yes, there is.", "Yes."]))
    assert scores.metrics["accuracy"] == 0.5 and scores.metrics["yes_ratio"] == 1.0
    assert scores.categories["random"]["accuracy"] == 1.0


def test_vqav2_questions_annotations_and_answer_types(tmp_path):
    png(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 7, "image_id": 42, "question": "How many?"}]}))
    answers = [{"answer": a, "answer_id": k} for k, a in enumerate(["2"] * 3 + ["3"] * 7)]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 7, "image_id": 42, "answer_type": "number", "question_type": "how many", "answers": answers}]}))
    task = task_of("vqav2", tmp_path, questions="q.json", annotations="a.json")
    assert task.items[0].question.startswith("How many?\nAnswer the question")
    scores = task.score(task.items, preds(task, ["Two"]))
    assert scores.metrics["accuracy"] == pytest.approx(0.9) and scores.categories["number"]["n"] == 1


def test_msrvtt_and_msvd_layouts(tmp_path):
    mp4(tmp_path / "video" / "video7.mp4")
    (tmp_path / "test_qa.json").write_text(json.dumps([{"id": 0, "video_id": 7, "question": "what is it?", "answer": "cat"}]))
    task = task_of("videoqa", tmp_path)
    assert task.score(task.items, preds(task, ["A cat."])).metrics == {"accuracy": 1.0, "n": 1}
    mp4(tmp_path / "clip.mp4").rename((tmp_path / "YouTubeClips").mkdir() or tmp_path / "YouTubeClips" / "abc_1_5.avi")
    (tmp_path / "youtube_mapping.txt").write_text("abc_1_5 vid7\n")
    msvd = task_of("videoqa", tmp_path, mapping="youtube_mapping.txt", videos="YouTubeClips/{name}.avi",
                   judge="tests.test_eval_loaders:lenient_judge")
    assert msvd.items[0].media[0].path.endswith("abc_1_5.avi")
    assert msvd.score(msvd.items, preds(msvd, ["kitten"])).metrics == {"accuracy": 0.0, "judge_score": 0.5, "n": 1}


def lenient_judge(question: str, answer: str, prediction: str) -> float:
    return 0.5


def test_librispeech_layout(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    wav(chapter / "1089-134686-0000.flac")
    wav(chapter / "1089-134686-0001.flac")
    (chapter / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE WOULD BE STEW\n1089-134686-0001 STUFF IT\n")
    task = task_of("librispeech", tmp_path / "LibriSpeech")
    assert [i.category for i in task.items] == ["test-clean", "test-clean"]
    scores = task.score(task.items, preds(task, ["he hoped there would be stew", "stuff it in"]))
    assert scores.metrics["wer"] == pytest.approx(1 / 8) and scores.per_item["test-clean/1089-134686-0000"] == 1.0


def test_librispeech_subsets_that_reuse_an_utterance_id_stay_apart(tmp_path):
    for subset, words in (("test-clean", "ONE TWO"), ("test-real", "THREE")):
        chapter = tmp_path / subset / "1" / "1"
        wav(chapter / "1-1-0000.flac")
        (chapter / "1-1.trans.txt").write_text(f"1-1-0000 {words}\n")
    task = task_of("librispeech", tmp_path)
    assert [i.id for i in task.items] == ["test-clean/1-1-0000", "test-real/1-1-0000"]
    scores = task.score(task.items, preds(task, ["one two", "four"]))
    assert scores.categories["test-clean"]["wer"] == 0.0 and scores.categories["test-real"]["wer"] == 1.0


def test_an_item_whose_id_repeats_is_a_bad_item(tmp_path):
    png(tmp_path / "a.png")
    rows = [{"id": "q1", "media": [{"type": "image", "path": "a.png"}], "question": "Which digit?", "answer": a}
            for a in ("1", "2")]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadRecordError, match="jsonl:q1: duplicate_id"):
        task_of("jsonl", tmp_path / "qa.jsonl")
    task = task_of("jsonl", tmp_path / "qa.jsonl", policy="skip")
    assert [i.answer for i in task.items] == ["1"] and "duplicate_id" in task.skipped[0]


def test_clotho_and_audiocaps_captions(tmp_path, monkeypatch):
    monkeypatch.setattr("mllm.eval.metrics.shutil.which", lambda name: None)
    wav(tmp_path / "evaluation" / "rain.wav")
    (tmp_path / "clotho_captions_evaluation.csv").write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\nrain.wav,Rain falls.,Rain on a roof.,,,\n")
    clotho = task_of("captioning", tmp_path)
    assert clotho.items[0].answer == ["Rain falls.", "Rain on a roof."]
    assert clotho.score(clotho.items, preds(clotho, ["rain falls"])).metrics["cider"].startswith("skipped: no Java")
    wav(tmp_path / "audio" / "yt1.wav")
    (tmp_path / "test.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,yt1,0,A dog barks\n2,yt1,0,Barking\n")
    audiocaps = task_of("captioning", tmp_path, captions="test.csv", audio="audio/{youtube_id}.wav")
    assert [(i.id, i.answer) for i in audiocaps.items] == [("audio/yt1.wav", ["A dog barks", "Barking"])]


def test_generic_jsonl_comprehension_and_generation(tmp_path):
    png(tmp_path / "img" / "1.png")
    lines = [{"id": "q1", "media": [{"type": "image", "path": "img/1.png"}], "question": "Which digit?", "answer": "7",
              "choices": ["1", "7"], "category": "digits"},
             {"id": "q2", "question": "Colour of the sky?", "answer": "B", "choices": ["red", "blue"]}]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    task = task_of("jsonl", tmp_path / "mine.jsonl")
    assert task.mode == "both" and task.items[0].messages()[0]["content"][0]["path"].endswith("img/1.png")
    assert task.score(task.items, preds(task, ["7", "blue"])).metrics["accuracy"] == 1.0
    assert task.score(task.items, [Prediction("q1", choice=0), Prediction("q2", choice=1)]).metrics["accuracy"] == 0.5
    (tmp_path / "gen.jsonl").write_text(json.dumps({"id": "g1", "prompt": "Draw a seven.", "target": "7"}) + "\n")
    gen = task_of("jsonl", tmp_path / "gen.jsonl", generate="image")
    assert gen.mode == "media" and gen.modality == "image" and gen.items[0].question == "Draw a seven."


def test_a_malformed_line_or_missing_media_fails_naming_file_and_line_or_is_skipped(tmp_path):
    png(tmp_path / "ok.png")
    good = {"id": "a", "media": [{"type": "image", "path": "ok.png"}], "question": "q", "answer": "x"}
    missing = {"id": "b", "media": [{"type": "image", "path": "gone.png"}], "question": "q", "answer": "x"}
    file = tmp_path / "mine.jsonl"
    file.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(missing) + "\n" + json.dumps({"id": "c"}) + "\n")
    with pytest.raises(BadRecordError, match=r"mine.jsonl:2: invalid_json"):
        task_of("jsonl", file)
    task = task_of("jsonl", file, policy="skip")
    assert [i.id for i in task.items] == ["a"]
    assert [s.split(": ")[1] for s in task.skipped] == ["invalid_json", "missing_media", "malformed_message"]
    assert "mine.jsonl:3" in task.skipped[1] and "gone.png" in task.skipped[1]
    assert "missing field 'answer'" in task.skipped[2]


def test_task_specs_are_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_BENCHMARKS", str(tmp_path))
    spec = tmp_path / "pope.yaml"
    spec.write_text("loader: pope\npath: ${MLLM_BENCHMARKS}/POPE\noptions: {images: val2014}\n")
    assert load_task_spec(spec).path == str(tmp_path / "POPE") and load_task_spec(spec).name == "pope"
    spec.write_text("loader: pope\npath: x\noptions: {imgs: val2014}\n")
    with pytest.raises(ConfigError, match="options.imgs"):
        load_task_spec(spec)
    spec.write_text("loader: nosuch\npath: x\n")
    with pytest.raises(ConfigError, match="unknown loader 'nosuch'"):
        load_task_spec(spec)
    spec.write_text("loader: pope\npath: POPE\n")
    with pytest.raises(FileNotFoundError, match="pope: no such file or folder"):
        build_task(load_task_spec(spec))


def test_the_generation_scorer_judges_only_the_files_that_were_made():
    from mllm.eval.loaders.jsonl import generation_scorer
    from mllm.eval.tasks import Item

    judged = []

    def judge(paths):  # a custom judge opens what it is given: an unfinished item's "" would be the working dir
        judged.append(list(paths))
        return ["3" for _ in paths]

    items = [Item(str(i), "Draw a 3.", "3") for i in range(3)]
    predictions = [Prediction("0", files=["0.png"]), Prediction("1"), Prediction("2", files=["2.png"])]
    scores = generation_scorer(lambda: judge, "custom")(items, predictions)
    assert judged == [["0.png", "2.png"]] and scores.per_item == {"0": 1.0, "1": 0.0, "2": 1.0}
