"""Chat templates: how turns are framed around their content.

A template is data, not code, so that the processor can tokenize each piece on
its own and know exactly which tokens belong to assistant content (and get
labels). It is saved with the checkpoint.

    [bos] system_prefix SYSTEM system_suffix      (system_prefix None: SYSTEM system_suffix opens the first user turn)
          user_prefix USER user_suffix
          assistant_prefix ASSISTANT assistant_suffix [eos]     <- labelled: ASSISTANT ... [eos]

A template whose assistant_suffix holds its own end-of-turn token (ChatML's `<|im_end|>`) names it as
stop_token: generation ends a reply there, whatever the tokenizer's eos is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mllm.registry import Registry


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    bos: bool = True  # start with the tokenizer's bos token (if it has one)
    system_prefix: str | None = ""
    system_suffix: str = "\n\n"
    user_prefix: str = "User: "
    user_suffix: str = "\n"
    assistant_prefix: str = "Assistant:"
    assistant_suffix: str = "\n"  # labelled, so the model learns to end its turn
    assistant_eos: bool = True  # end each assistant turn with the tokenizer's eos token (labelled)
    stop_token: str | None = None  # the token in assistant_suffix that ends a turn: replies stop there, as at eos

    def frame(self, role: str) -> tuple[str, str]:
        """(prefix, suffix) around one turn of `role`."""
        return {
            "system": (self.system_prefix or "", self.system_suffix),
            "user": (self.user_prefix, self.user_suffix),
            "assistant": (self.assistant_prefix, self.assistant_suffix),
        }[role]


TEMPLATES: Registry[ChatTemplate] = Registry("chat template")


def list_chat_templates() -> list[str]:
    return TEMPLATES.names()


def get_chat_template(name: str) -> ChatTemplate:
    return TEMPLATES.build(name)


def chat_template_from_dict(saved: dict) -> ChatTemplate:
    """A template as saved with asdict; a field an older save lacks comes from the registered template of its name."""
    known = asdict(get_chat_template(saved["name"])) if saved.get("name") in TEMPLATES else {}
    return ChatTemplate(**{**known, **saved})


def _add(template: ChatTemplate) -> None:
    TEMPLATES.register(template.name)(lambda: template)


# Plain role names: for base models trained by the project's own recipes.
_add(ChatTemplate(name="plain"))
# Mistral / Llama-2 instruct: <s>[INST] user [/INST] assistant</s>
_add(
    ChatTemplate(
        name="mistral",
        system_prefix=None,
        system_suffix="\n\n",
        user_prefix="[INST] ",
        user_suffix=" [/INST]",
        assistant_prefix="",
        assistant_suffix="",
    )
)
# ChatML (Qwen2): <|im_start|>role\n...<|im_end|>\n
_add(
    ChatTemplate(
        name="chatml",
        bos=False,
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
        assistant_eos=False,
        stop_token="<|im_end|>",
    )
)
