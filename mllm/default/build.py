"""`mllm default train`: make the embedded default model from the built corpora, every stage, one command.

    tokenizers   tokenizers/image_diffusion_captioned_tiny.yaml, tokenizers/audio_mel_diffusion_tiny.yaml
                 (`mllm tokenize train`; skipped for a modality given an already trained directory)
    corpora      the built corpora, spoken replies padded to `audio_seconds` (mllm/default/corpus.py)
    text         finetune/recipes/default_text.yaml: SentencePiece tokenizer, then LM pretraining
    multimodal   finetune/recipes/default_multimodal.yaml: every task, GMM heads
    diffusion    finetune/recipes/default_diffusion_head.yaml: the same model with a diffusion image head
    ship         float16 copies of both variants in <out>/checkpoint/{gmm,diffusion}; with `ship`,
                 also into the package (mllm/default/checkpoint/), where chat, serve, eval and demo find them

Each stage writes its loss curve (`loss.png`) and is skipped when its output
exists, so an interrupted build continues where it stopped. Seeds are fixed in
the recipes. Stage times go to `<out>/stages.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mllm.default.corpus import prepare_corpora
from mllm.default.paths import CHECKPOINTS
from mllm.default.ship import ship, size_mb
from mllm.tokenize import commands as tokenize
from mllm.train import finetune, load_recipe

ROOT = Path(__file__).resolve().parents[2]  # the repository: its tokenizers/ and finetune/recipes/
MODALITIES = ("image", "audio")


@dataclass
class DefaultBuildConfig:
    corpora: Path  # built corpora (`mllm data build`)
    out: Path = Path("runs/default")
    tokenizers: dict[str, Path] = field(default_factory=dict)  # modality -> an already trained tokenizer recipe dir
    tokenizer_recipes: dict[str, Path] = field(default_factory=lambda: {
        "image": ROOT / "tokenizers" / "image_diffusion_captioned_tiny.yaml",
        "audio": ROOT / "tokenizers" / "audio_mel_diffusion_tiny.yaml",
    })
    recipes: Path = ROOT / "finetune" / "recipes"
    corpora_used: list[str] = field(default_factory=lambda: ["digits", "stamps", "speech", "sounds", "interleaved"])
    audio_seconds: float = 2.4  # 60 tokens of the mel tokenizer: every spoken reply
    # The image tokenizer learns digits only; its stamps come back unreadable, and learning to draw them
    # slowed the digits' drawing (the parallel head's loss stayed high), so the model does not draw stamps.
    skip_tasks: dict[str, set[str]] = field(default_factory=lambda: {"stamps": {"image_generation"}})
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> dotted recipe overrides
    ship: bool = False  # also install into the package


class Build:
    def __init__(self, cfg: DefaultBuildConfig):
        self.cfg, self.out = cfg, cfg.out.absolute()
        self.times_file = self.out / "stages.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}

    def stage(self, name: str, done: Path, work) -> None:
        if done.exists():
            print(f"[default] {name}: done earlier ({done})", flush=True)
            return
        print(f"[default] {name} ...", flush=True)
        started = time.perf_counter()
        work()
        self.times[name] = round(time.perf_counter() - started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        self.times_file.write_text(json.dumps(self.times, indent=1) + "\n")
        print(f"[default] {name}: {self.times[name]:.0f} s", flush=True)

    def tokenizer_dir(self, modality: str) -> Path:
        given = self.cfg.tokenizers.get(modality)
        return Path(given).absolute() if given else self.out / "tokenizers" / modality

    def finetune(self, stage: str, recipe: str, overrides: list[str]) -> None:
        path = self.cfg.recipes / recipe
        finetune(load_recipe(path, overrides + self.cfg.overrides.get(stage, [])))

    def run(self) -> dict[str, float]:
        o, corpora = self.out, Path(self.cfg.corpora).absolute()
        for m in MODALITIES:
            if m not in self.cfg.tokenizers:
                self.stage(f"tokenizer:{m}", o / "tokenizers" / m / "metrics.json",
                           lambda m=m: tokenize.train(self.cfg.tokenizer_recipes[m], corpora, o / "tokenizers" / m))
        data = o / "data"
        self.stage("corpora", data / "done", lambda: (
            prepare_corpora(corpora, data, self.cfg.corpora_used, set(MODALITIES), self.cfg.audio_seconds,
                            self.cfg.skip_tasks), (data / "done").touch()))
        common = [f"data.cache_dir={o / 'cache'}"]
        self.stage("text", o / "text" / "final", lambda: self.finetune("text", "default_text.yaml", common + [
            f"output_dir={o / 'text'}", f"model.tokenizer={o / 'text_tokenizer'}", f"data.root={corpora}"]))
        media = [f"model.media.{m}.path={self.tokenizer_dir(m) / 'media_tokenizer'}" for m in MODALITIES]
        self.stage("multimodal", o / "multimodal" / "final", lambda: self.finetune("multimodal", "default_multimodal.yaml", common + media + [
            f"output_dir={o / 'multimodal'}", f"model.base={o / 'text' / 'final'}", f"data.root={data}"]))
        self.stage("diffusion", o / "diffusion_head" / "final", lambda: self.finetune("diffusion", "default_diffusion_head.yaml", common + [
            f"output_dir={o / 'diffusion_head'}", f"init_from={o / 'multimodal' / 'final'}", f"data.root={data}"]))
        detokenizers = {m: self.tokenizer_dir(m) / "detokenizer" for m in MODALITIES}
        shipped = o / "checkpoint"
        ship(o / "multimodal" / "final", detokenizers, shipped / "gmm")
        ship(o / "diffusion_head" / "final", detokenizers, shipped / "diffusion", shared=shipped / "gmm")
        print(f"[default] checkpoints: {shipped} ({size_mb(shipped):.1f} MB)")
        if self.cfg.ship:
            shutil.rmtree(CHECKPOINTS, ignore_errors=True)
            shutil.copytree(shipped, CHECKPOINTS)
            print(f"[default] installed into the package: {CHECKPOINTS} ({size_mb(CHECKPOINTS):.1f} MB)")
        return self.times
