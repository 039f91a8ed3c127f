"""`mllm default train`: make the embedded default model from the built corpora, every stage, one command.

    image_tokenizer  tokenizers/image_diffusion_captioned_tiny.yaml  ┐ `mllm tokenize train`; skipped for a
    audio_tokenizer  tokenizers/audio_mel_diffusion_tiny.yaml        │ modality given a trained directory
    video_tokenizer  tokenizers/video_divot_captioned_tiny.yaml      ┘
    image_ink        tokenizers/image_ink_invariance_tiny.yaml: a copy of the image tokenizer that writes the
                     tokens the LM learns to read for a digit in any ink on any paper, anywhere in its frame
    video_ink        tokenizers/video_ink_invariance_tiny.yaml: the same for the video tokenizer, a clip in any
                     ink on any paper, framed any way; the ink stages' tokenizers are the ones shipped
    text             finetune/recipes/default_text.yaml: SentencePiece tokenizer, then LM pretraining
    corpora          the built corpora; spoken replies in one house voice, padded to `audio_seconds`, and
                     requested animations in one canonical layout (mllm/default/corpus.py)
    multimodal       finetune/recipes/default_multimodal.yaml: every task, GMM heads
    speech           finetune/recipes/default_speech_head.yaml: the audio head alone, on the frozen LM
    video            finetune/recipes/default_video_head.yaml: the video head alone, on the frozen LM
    diffusion        finetune/recipes/default_diffusion_head.yaml: a diffusion image head on the frozen LM
    ship             float16 copies of both variants in <out>/checkpoint/{gmm,diffusion}; with `ship`,
                     also into the package (mllm/default/checkpoint/), where chat, serve, eval and demo find them

The tokenizers, their ink stages, the text stage and the corpora stage need only the built corpora, so they
run side by side in two processes of one thread each (`LANES`), their output in
`<out>/logs/`: on two cores, two one-thread trainings finish in ~0.8 of the
time they take one after another on both threads (the video tokenizer: 1368 s
beside another job, 863 s alone). Each stage writes its loss curve (`loss.png`) and is skipped
when its output exists, so an interrupted build continues where it stopped.
Seeds are fixed in the recipes. Stage times go to `<out>/stages.json`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from mllm.default.corpus import prepare_corpora
from mllm.default.paths import CHECKPOINTS
from mllm.default.ship import ship, size_mb
from mllm.tokenize import commands as tokenize
from mllm.train import finetune, load_recipe

ROOT = Path(__file__).resolve().parents[2]  # the repository: its tokenizers/ and finetune/recipes/
MODALITIES = ("image", "audio", "video")
# Side by side, the most even split: image tokenizer, its ink stage, the text LM and the corpora (~1940 s) ‖ video
# tokenizer, its ink stage and the audio tokenizer (~1960 s; at the fifteenth build's speed, docs/default_model.md).
LANES = (("image_tokenizer", "image_ink", "text", "corpora"), ("video_tokenizer", "video_ink", "audio_tokenizer"))


@dataclass
class DefaultBuildConfig:
    corpora: Path  # built corpora (`mllm data build`)
    out: Path = Path("runs/default")
    tokenizers: dict[str, Path] = field(default_factory=dict)  # modality -> an already trained tokenizer recipe dir
    tokenizer_recipes: dict[str, Path] = field(default_factory=lambda: {
        "image": ROOT / "tokenizers" / "image_diffusion_captioned_tiny.yaml",
        "audio": ROOT / "tokenizers" / "audio_mel_diffusion_tiny.yaml",
        "video": ROOT / "tokenizers" / "video_divot_captioned_tiny.yaml",
    })
    ink_recipes: dict[str, Path] = field(default_factory=lambda: {  # modality -> its ink stage's recipe
        "image": ROOT / "tokenizers" / "image_ink_invariance_tiny.yaml",
        "video": ROOT / "tokenizers" / "video_ink_invariance_tiny.yaml",
    })
    recipes: Path = ROOT / "finetune" / "recipes"
    corpora_used: list[str] = field(default_factory=lambda: ["digits", "stamps", "speech", "sounds", "video", "interleaved"])
    audio_seconds: float = 2.4  # 60 tokens of the mel tokenizer: every spoken reply
    # The image tokenizer learns digits only; its stamps come back unreadable, and learning to draw them
    # slowed the digits' drawing (the parallel head's loss stayed high), so the model does not draw stamps.
    skip_tasks: dict[str, set[str]] = field(default_factory=lambda: {"stamps": {"image_generation"}})
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> dotted recipe overrides
    ship: bool = False  # also install into the package


@dataclass(frozen=True)
class Stage:
    name: str
    done: Path  # exists once the stage has finished
    work: Callable[[], object]  # picklable: side-by-side stages run in other processes

    def run(self) -> float | None:
        """Seconds the stage took; None when it was done earlier."""
        if self.done.exists():
            print(f"[default] {self.name}: done earlier ({self.done})", flush=True)
            return None
        print(f"[default] {self.name} ...", flush=True)
        started = time.perf_counter()
        self.work()
        seconds = round(time.perf_counter() - started, 1)
        print(f"[default] {self.name}: {seconds:.0f} s", flush=True)
        return seconds


def run_lane(stages: list[Stage], log: Path, threads: int) -> dict[str, float]:
    """Run stages one after another in this process, on `threads` threads, printing into `log`."""
    import torch

    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):  # native libraries' output too
            os.dup2(f.fileno(), fd)
        times = {}
        for stage in stages:
            try:
                seconds = stage.run()
            except Exception as e:
                traceback.print_exc()
                raise RuntimeError(f"{stage.name} failed ({type(e).__name__}: {e})") from None
            if seconds is not None:
                times[stage.name] = seconds
        return times


def side_by_side(lanes: list[list[Stage]], logs: Path) -> dict[str, float]:
    """Each lane in its own process with one thread; a progress bar counts finished stages. A failed lane
    lets the others finish (their work is kept), then raises, naming its log."""
    logs_of = [logs / f"{'+'.join(s.name for s in lane)}.log" for lane in lanes]
    chains = " ‖ ".join(" → ".join(s.name for s in lane) for lane in lanes)
    print(f"[default] side by side, one thread each: {chains} (logs: {logs})", flush=True)
    times: dict[str, float] = {}
    failures = []
    with ProcessPoolExecutor(len(lanes), mp_context=multiprocessing.get_context("spawn")) as pool, \
            tqdm(total=sum(map(len, lanes)), desc="stages side by side", unit="stage") as bar:
        running: dict[Future, Path] = {pool.submit(run_lane, lane, log, 1): log for lane, log in zip(lanes, logs_of)}
        pending = set(running)
        while pending:
            finished, pending = wait(pending, timeout=10, return_when=FIRST_COMPLETED)
            bar.n = sum(s.done.exists() for lane in lanes for s in lane)
            bar.refresh()
            for future in finished:
                try:
                    times.update(future.result())
                except Exception as e:
                    failures.append(f"{e}; its output: {running[future]}")
                    tqdm.write(f"[default] {failures[-1]}" + ("; the other stages go on" if pending else ""))
    if failures:
        raise RuntimeError("; ".join(failures))
    return times


class Build:
    def __init__(self, cfg: DefaultBuildConfig):
        self.cfg, self.out = cfg, cfg.out.absolute()
        self.times_file = self.out / "stages.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}

    def record(self, times: dict[str, float]) -> None:
        self.times.update(times)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.times_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.times, indent=1) + "\n")
        os.replace(tmp, self.times_file)

    def tokenizer_dir(self, modality: str) -> Path:
        given = self.cfg.tokenizers.get(modality)
        return Path(given).absolute() if given else self.out / "tokenizers" / modality

    def finetune(self, stage: str, recipe: str, overrides: list[str]) -> None:
        path = self.cfg.recipes / recipe
        finetune(load_recipe(path, overrides + self.cfg.overrides.get(stage, [])))

    def stages(self) -> dict[str, Stage]:
        o, corpora, data = self.out, Path(self.cfg.corpora).absolute(), self.out / "data"
        stages = [Stage(f"{m}_tokenizer", o / "tokenizers" / m / "metrics.json", partial(
            tokenize.train, self.cfg.tokenizer_recipes[m], corpora, o / "tokenizers" / m,
            self.cfg.overrides.get(f"{m}_tokenizer", []))) for m in MODALITIES if m not in self.cfg.tokenizers]
        # each ink stage teaches a copy of the tokenizer the LM trains on: that tokenizer's tokens are its targets
        stages += [Stage(f"{m}_ink", o / "tokenizers" / f"{m}_ink" / "metrics.json", partial(
            tokenize.train, recipe, corpora, o / "tokenizers" / f"{m}_ink",
            [f"teacher={self.tokenizer_dir(m)}"] + self.cfg.overrides.get(f"{m}_ink", [])))
            for m, recipe in self.cfg.ink_recipes.items()]
        common = [f"data.cache_dir={o / 'cache'}"]
        media = [f"model.media.{m}.path={self.tokenizer_dir(m) / 'media_tokenizer'}" for m in MODALITIES]
        stages += [
            Stage("text", o / "text" / "final", partial(self.finetune, "text", "default_text.yaml", common + [
                f"output_dir={o / 'text'}", f"model.tokenizer={o / 'text_tokenizer'}", f"data.root={corpora}"])),
            Stage("corpora", data / "done", partial(self.corpora, corpora, data)),
            Stage("multimodal", o / "multimodal" / "final", partial(self.finetune, "multimodal", "default_multimodal.yaml",
                  common + media + [f"output_dir={o / 'multimodal'}", f"model.base={o / 'text' / 'final'}", f"data.root={data}"])),
        ]
        before = "multimodal"  # each head stage (recipe default_<run>.yaml) starts from the stage before it
        for name, run in (("speech", "speech_head"), ("video", "video_head"), ("diffusion", "diffusion_head")):
            stages.append(Stage(name, o / run / "final", partial(self.finetune, name, f"default_{run}.yaml", common + [
                f"output_dir={o / run}", f"init_from={o / before / 'final'}", f"data.root={data}"])))
            before = run
        return {s.name: s for s in stages}

    def corpora(self, corpora: Path, data: Path) -> None:
        prepare_corpora(corpora, data, self.cfg.corpora_used, set(MODALITIES), self.cfg.audio_seconds, self.cfg.skip_tasks)
        (data / "done").touch()

    def run(self) -> dict[str, float]:
        stages = self.stages()
        lanes = [[stages[n] for n in lane if n in stages and not stages[n].done.exists()] for lane in LANES]
        if sum(map(bool, lanes)) > 1:
            started = time.perf_counter()
            times = side_by_side([lane for lane in lanes if lane], self.out / "logs")
            self.record({**times, "side_by_side_wall": round(time.perf_counter() - started, 1)})
        for stage in stages.values():
            if (seconds := stage.run()) is not None:
                self.record({stage.name: seconds})
        detokenizers = {m: self.tokenizer_dir(m) / "detokenizer" for m in MODALITIES}
        shipped = self.out / "checkpoint"
        inked = {m: self.out / "tokenizers" / f"{m}_ink" / "media_tokenizer" for m in self.cfg.ink_recipes}
        ship(self.out / "video_head" / "final", detokenizers, shipped / "gmm", media_tokenizers=inked)
        ship(self.out / "diffusion_head" / "final", detokenizers, shipped / "diffusion", shared=shipped / "gmm")
        print(f"[default] checkpoints: {shipped} ({size_mb(shipped):.1f} MB)")
        if self.cfg.ship:
            shutil.rmtree(CHECKPOINTS, ignore_errors=True)
            shutil.copytree(shipped, CHECKPOINTS)
            print(f"[default] installed into the package: {CHECKPOINTS} ({size_mb(CHECKPOINTS):.1f} MB)")
        return self.times
