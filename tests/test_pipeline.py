"""Pipeline: conversations in, interleaved text and decoded media out, saved and loaded as one directory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from mllm.checkpoint import HeadConfig, MediaConfig, ModelConfig, build_model
from mllm.detokenizers import build_detokenizer
from mllm.generation import GenerationConfig, HeadSampling
from mllm.media import Image
from mllm.pipeline import Pipeline
from tests.conftest import TINY_LMS

PATCH = {"image_size": 8, "patch_size": 4}  # 4 tokens of 48 per image


@pytest.fixture(scope="module")
def pipeline(mistral_tokenizer_dir) -> Pipeline:
    model, processor = build_model(ModelConfig(
        base_config=dict(TINY_LMS["llama"]),
        tokenizer=str(mistral_tokenizer_dir),
        media={"image": MediaConfig(tokenizer="patch", options=PATCH, tokens_per_item=4)},
        heads={"image": HeadConfig(name="gmm", options={"num_components": 2})},
    ))
    return Pipeline(model, processor, {"image": build_detokenizer("patch", PATCH)})


def test_forced_image_is_decoded_and_text_stays_text(pipeline):
    conversations = [[{"role": "user", "content": "Draw a square."}], [{"role": "user", "content": "Another one."}]]
    seen = []
    replies = pipeline.chat(conversations, GenerationConfig(max_new_tokens=12, seed=0), force="image",
                            on_media=lambda row, media: seen.append((row, media)))
    for reply in replies:
        images = [i for i in reply if isinstance(i, Image)]
        assert len(images) == 1 and images[0].pixels.shape == (8, 8, 3)
        assert all(isinstance(i, (str, Image)) for i in reply)
    assert sorted(row for row, _ in seen) == [0, 1]
    assert seen[0][1] in replies[seen[0][0]]  # the streamed medium is the one returned, decoded once


def test_guidance_runs_the_unconditional_stream_and_scale_one_does_not(pipeline):
    messages = [[{"role": "user", "content": "Draw."}]]
    plain = pipeline.chat(messages, GenerationConfig(max_new_tokens=6, seed=1), force="image")
    same = pipeline.chat(messages, GenerationConfig(max_new_tokens=6, seed=1, continuous=HeadSampling(cfg_scale=1.0)), force="image")
    guided = pipeline.chat(messages, GenerationConfig(max_new_tokens=6, seed=1, continuous=HeadSampling(cfg_scale=3.0)), force="image")
    assert (plain[0][0].pixels == same[0][0].pixels).all()
    assert isinstance(guided[0][0], Image)


def test_generate_media_and_save_load_round_trip(pipeline, tmp_path):
    conversations = [[{"role": "user", "content": "Draw a 3."}]]
    config = GenerationConfig(max_new_tokens=6, seed=2)
    [before] = pipeline.generate_media(conversations, "image", config=config)
    pipeline.save_pretrained(tmp_path / "ckpt")
    loaded = Pipeline.from_pretrained(tmp_path / "ckpt")
    assert set(loaded.detokenizers) == {"image"}
    [after] = loaded.generate_media(conversations, "image", config=config)
    assert (before.pixels == after.pixels).all()


def test_generate_media_gives_none_for_a_reply_whose_medium_max_new_tokens_cut(pipeline):
    """An image takes 4 slots and its end marker: 3 new tokens cut it, and it is dropped."""
    conversations = [[{"role": "user", "content": "Draw a 3."}], [{"role": "user", "content": "Draw a 4."}]]
    assert pipeline.generate_media(conversations, "image", config=GenerationConfig(max_new_tokens=3)) == [None, None]


def test_reply_logprobs_score_the_reply_and_not_the_earlier_assistant_turns(pipeline):
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello, how can I help?"},
               {"role": "user", "content": "Say yes."}]
    replies = ["yes", "no way"]
    scored = pipeline.reply_logprobs([history, history], replies)
    for reply, (logprob, greedy) in zip(replies, scored):
        ids = pipeline.processor([history + [{"role": "assistant", "content": reply}]]).input_ids[0]
        start = len(pipeline.processor.encode(history, add_generation_prompt=True))  # the reply's first token
        with torch.no_grad():
            log_probs = pipeline.model(input_ids=ids[None]).logits[0, start - 1:-1].float().log_softmax(-1)
        expected = log_probs.gather(-1, ids[start:, None]).sum()
        assert logprob == pytest.approx(float(expected), abs=1e-4)
        assert greedy == bool(log_probs.argmax(-1).eq(ids[start:]).all())


@pytest.mark.parametrize("end", ["<|im_end|>", "</s>"])
def test_chatml_reply_ends_at_im_end_and_at_the_tokenizers_eos(mistral_tokenizer_dir, tmp_path, end):
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(tmp_path)
    model, processor = build_model(ModelConfig(base_config=dict(TINY_LMS["llama"], vocab_size=len(tokenizer)),
                                               tokenizer=str(tmp_path), chat_template="chatml"))
    chat = Pipeline(model, processor)
    conversation = [[{"role": "user", "content": "Hi"}]]
    head, seen = model.get_output_embeddings(), []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0][0, -1].clone()))
    chat.chat(conversation, GenerationConfig(max_new_tokens=1))
    hook.remove()
    head.weight.data.zero_()
    head.weight.data[tokenizer.convert_tokens_to_ids(end)] = seen[0]  # the prompt's last position now writes it
    assert tokenizer.eos_token == "</s>"
    finished = []
    assert chat.chat(conversation, GenerationConfig(max_new_tokens=8), on_finish=lambda row, why, n: finished.append(why)) == [[]]
    assert finished == ["eos"]  # not "length": training labels <|im_end|> the end of a turn; a base LM writes eos
    assert chat.complete(conversation, max_new_tokens=8) == [""]


def test_missing_detokenizer_is_named(pipeline):
    bare = Pipeline(pipeline.model, pipeline.processor)
    with pytest.raises(KeyError, match="no image de-tokenizer in this pipeline"):
        bare.chat([[{"role": "user", "content": "Draw."}]], GenerationConfig(max_new_tokens=6), force="image")


def test_eval_generation_task_writes_one_file_per_item(pipeline, tmp_path):
    """`mllm eval --generate image` runs through the pipeline and lists the produced files."""
    import json

    from mllm.eval.runner import evaluate

    pipeline.save_pretrained(tmp_path / "ckpt")
    task = tmp_path / "draw.jsonl"
    task.write_text("".join(json.dumps({"id": f"d{i}", "prompt": f"Draw {i}.", "target": str(i)}) + "\n" for i in range(3)))
    evaluate(tmp_path / "ckpt", [str(task)], tmp_path / "out", corpora=tmp_path, generate="image", batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["d0", "d1", "d2"]
    for r in rows:
        assert len(r["files"]) == 1 and (tmp_path / "out" / r["files"][0]).is_file()
