"""Every YAML file the repository ships loads into its typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm.data.corpora.build import load_build_config
from mllm.detokenizers import load_detokenizer
from mllm.eval.tasks import load_task_spec
from mllm.tokenize.recipes import load_recipe
from mllm.tokenizers import load_media_tokenizer
from mllm.train.recipe import load_recipe as load_finetune_recipe

ROOT = Path(__file__).resolve().parents[1]
# folder glob -> the loader that validates it; a shipped YAML no entry covers fails the test
LOADERS = {
    "data/build*.yaml": load_build_config,
    "tokenizers/*.yaml": load_recipe,
    "finetune/recipes/*.yaml": load_finetune_recipe,
    "eval/tasks/*.yaml": load_task_spec,
    "mllm/default/checkpoint/*/media_tokenizers/*/media_tokenizer.yaml": lambda p: load_media_tokenizer(p.parent),
    "mllm/default/checkpoint/*/detokenizers/*/detokenizer.yaml": lambda p: load_detokenizer(p.parent),
}
SHIPPED = sorted(p for p in ROOT.rglob("*.yaml") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def test_every_shipped_yaml_has_a_schema():
    covered = {p for pattern in LOADERS for p in ROOT.glob(pattern)}
    uncovered = [str(p.relative_to(ROOT)) for p in SHIPPED if p not in covered]
    assert not uncovered, f"no typed config validates: {uncovered}"


@pytest.mark.parametrize("pattern, path", [(pat, p) for pat in LOADERS for p in sorted(ROOT.glob(pat))],
                         ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v)
def test_shipped_yaml_loads(pattern, path):
    LOADERS[pattern](path)
