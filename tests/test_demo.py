"""`mllm demo` runs every path of the shipped default model on the test split and writes its page."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    from mllm.data.corpora.build import build_corpora

    out = tmp_path_factory.mktemp("corpora")
    build_corpora(ROOT / "data" / "build_small.yaml", out, only=["digits", "speech", "sounds", "video", "interleaved"],
                  progress=False, overwrite=True)
    return out


def test_demo_writes_a_page_with_every_path(corpora, tmp_path, capsys):
    assert main(["demo", "--data", str(corpora), "--out", str(tmp_path / "demo")]) == 0
    page = (tmp_path / "demo" / "index.html").read_text()
    printed = capsys.readouterr().out
    for path in ("image → caption", "image → answer", "text → image (GMM head)", "text → image (diffusion head)",
                 "speech → text", "text → speech", "sound → caption", "video → answer", "text → video",
                 "interleaved conversation"):
        assert path in page and path in printed
    assert "not available" not in page
    assert page.count("data:image/png;base64,") >= 4 and page.count("data:audio/wav;base64,") >= 3
    assert page.count("data:video/mp4;base64,") >= 2  # the question's clip and the generated one
    assert all(list((tmp_path / "demo" / "media").glob(f"*.{suffix}")) for suffix in ("png", "wav", "mp4"))


def test_demo_without_corpora_says_how_to_build_them(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "demo")]) == 2
    assert f"mllm demo: no built corpora at {tmp_path / 'none'}: run `mllm data build` first" in capsys.readouterr().err


def test_a_path_whose_corpus_is_not_built_is_listed_as_not_available(tmp_path):
    from types import SimpleNamespace

    from mllm.demo import Demo, write_page

    reads_all = SimpleNamespace(processor=SimpleNamespace(layout=SimpleNamespace(modalities={"image", "audio", "video"})))
    shows = Demo(tmp_path, {"gmm": reads_all, "diffusion": reads_all}, seed=0).all()  # no corpus is built
    assert len(shows) == 10 and all(show.unavailable for show in shows)
    _, lines = write_page(shows, tmp_path / "demo", "demo")
    for path, corpus in (("image → caption", "digits"), ("text → image (diffusion head)", "digits"),
                         ("speech → text", "speech"), ("sound → caption", "sounds"), ("text → video", "video"),
                         ("interleaved conversation", "interleaved")):
        assert f"  {path:<30} not available: the {corpus} corpus is not built" in lines
