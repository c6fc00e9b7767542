"""The chat template an export carries, so that the exported model is prompted exactly as the run was trained.

A run's prompt is `style.apply(instruction, input=input)` (littune.prompts), tokenised by `littune.prepared.encode`:
the text's own tokens, BOS first where the tokenizer uses one (litgpt's `use_bos`). The export writes a Jinja chat
template (chat_template.jinja, tokenizer_config.json's chat_template, the GGUF's tokenizer.chat_template) whose
rendering of one user message, `instruction + "\\n\\n" + input` (just the instruction without an input), is that
prompt, so that transformers' `apply_chat_template(..., add_generation_prompt=True, tokenize=True)` gives the ids
the run was trained on:

- chat style (the model's own template): the base template, with the run's --system message put first where the
  conversation has no system message, as littune's chat style and `littune serve` do.
- a litgpt style (alpaca, ...): the style's text around the slots, found by rendering it with marker strings. The
  last user message is split at its first "\\n\\n" into the Instruction and the Input (littune's chat style joins
  them so); the last system message, where the style takes one, is its `sys_prompt`. Other turns are not part of
  such a prompt. The literal text is written as Jinja string expressions, never raw template text: transformers
  renders with trim_blocks and lstrip_blocks, which would eat a newline after a block tag.
- BOS: where littune's tokenizer puts BOS first (use_bos), the transformers template writes the BOS text first
  unless the prompt already starts with it; transformers tokenises a rendered chat with add_special_tokens=False.
  llama.cpp instead tokenises the rendered chat with parse_special and adds BOS itself when
  tokenizer.ggml.add_bos_token is true. The GGUF therefore gets add_bos_token = use_bos (and add_eos_token false: a
  prompt never ends with EOS), bos_token_id = littune's BOS id, and a template that drops a leading BOS text where
  use_bos: llama.cpp adds the one BOS whether or not its version strips a leading BOS text from the rendered chat
  (current versions do so only where they add BOS; some older ones always did, which cuts a ChatML prompt's first
  <|im_start|> where that is the BOS token and no BOS is added: no template can prevent that).

Without a run (an export of the base model), the base's template and metadata stay as they are.
"""

import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from littune.common import UserError, save_json, save_text

# marker strings rendered through a litgpt style to find its literal text around the slots
SLOTS = {"instruction": "LITTUNE_INSTRUCTION_5e1c", "input": "LITTUNE_INPUT_5e1c", "system": "LITTUNE_SYSTEM_5e1c"}
SLOT_PATTERN = "(" + "|".join(SLOTS.values()) + ")"  # the markers are plain word characters
# the template's expression for each marker's slot
EXPRESSIONS = {SLOTS["instruction"]: "instruction", SLOTS["input"]: "input", SLOTS["system"]: "ns.system"}
# the variable the rendered prompt is captured in, where BOS has to be checked at its start
CAPTURE = "littune_prompt"
# one user message of littune's chat style: instruction, blank line, input
INPUT_SEPARATOR = "\n\n"


class RunPrompt(NamedTuple):
    """How a run's prompts were made: its prompt style, whether BOS went first (use_bos) and the BOS text."""

    style: object
    use_bos: bool
    bos: Optional[str]
    bos_id: Optional[int]


def run_prompt(run_dir: Optional[Path], checkpoint_dir: Path, tokenizer: Callable) -> Optional[RunPrompt]:
    """The prompt rule of the run (its prompt_style.yaml; a `littune merge` output carries its run's), or None
    where there is none (an export of a base model, or of a run written before littune kept its style). use_bos
    and the BOS id are those the run's prepared data was tokenised with (prepare.json: a merged folder's name can
    change litgpt's use_bos), else those of the checkpoint's tokenizer (`tokenizer()`: the command's, loaded once)."""
    from littune.export.card import read_json, read_yaml
    from littune.prompts import STYLE_FILE, load_style_file

    checkpoint_dir = Path(checkpoint_dir)
    # a base checkpoint's own prompt_style.yaml (litgpt writes one on download) is no run's: its export keeps the
    # base template
    folders = [Path(run_dir)] if run_dir is not None else []
    if (checkpoint_dir / "merge.json").is_file():
        folders.append(checkpoint_dir)
    style_dir = next((folder for folder in folders if (folder / STYLE_FILE).is_file()), None)
    if style_dir is None:
        return None
    style = load_style_file(style_dir)
    tokenizer = tokenizer()
    data_dir = read_yaml(Path(run_dir) / "hyperparameters.yaml").get("data_dir") if run_dir is not None else None
    prepared = read_json(Path(data_dir) / "prepare.json").get("tokenizer") if data_dir else None
    prepared = prepared if isinstance(prepared, dict) else {}
    use_bos = prepared["use_bos"] if isinstance(prepared.get("use_bos"), bool) else bool(tokenizer.use_bos)
    bos_id = prepared["bos_id"] if isinstance(prepared.get("bos_id"), int) else tokenizer.bos_id
    return RunPrompt(style, use_bos, token_text(tokenizer, bos_id) if bos_id is not None else None, bos_id)


def token_text(tokenizer, token_id: int) -> str:
    if tokenizer.backend == "huggingface":
        text = tokenizer.processor.id_to_token(token_id)
    else:
        text = tokenizer.processor.IdToPiece(token_id)
    if not text:
        raise UserError(f"the tokenizer has no token {token_id} (its BOS id)")
    return text


def chat_template(prompt: RunPrompt, gguf: bool = False) -> str:
    """The Jinja chat template that renders one user message as the run's prompt (see the module docstring);
    gguf: the variant for llama.cpp, which adds BOS itself."""
    from littune.prompts import ChatTemplate, compile_chat_template

    if isinstance(prompt.style, ChatTemplate):
        head, body = system_injection(prompt.style.system), prompt.style.template
    else:
        head, body = "", instruction_template(prompt.style)
    if prompt.use_bos and prompt.bos is None:
        raise UserError("the run's tokenizer puts BOS first but has no BOS token; cannot write its chat template")
    template = head + (with_bos(body, prompt.bos, gguf) if prompt.use_bos else after_tag(head, body))
    compile_chat_template(template, "the exported chat template")  # fails here, not in the user's tool
    return template


def after_tag(head: str, body: str) -> str:
    """The base template after littune's statements: the newline after their last tag is eaten by trim_blocks, so
    the base template starts at the beginning of a line, exactly as when it is the whole template."""
    return "\n" + body if head else body


def system_injection(system: Optional[str]) -> str:
    """Statements that put the run's system message first where the conversation starts without one."""
    if system is None:
        return ""
    return ("{%- if not (messages and messages[0]['role'] == 'system') -%}{%- set messages = [{'role': 'system', "
            f"'content': {literal(system)}}}] + messages -%}}{{%- endif %}}")


def with_bos(body: str, bos: str, gguf: bool) -> str:
    """body (a template) with the BOS rule of a tokenizer that puts BOS first: the rendered prompt is captured;
    transformers' template writes the BOS text first where the prompt does not start with it, llama.cpp's drops a
    leading BOS text (llama.cpp adds BOS itself), cut by its own length in the engine's units (characters in
    Jinja, perhaps bytes in llama.cpp's)."""
    captured = f"{{% set {CAPTURE} %}}\n{body}{{% endset %}}"
    if gguf:
        return (captured + f"{{%- if {CAPTURE}.startswith({literal(bos)}) -%}}{{{{- {CAPTURE}[{literal(bos)} | length:] -}}}}"
                f"{{%- else -%}}{{{{- {CAPTURE} -}}}}{{%- endif -%}}")
    return (captured + f"{{%- if not {CAPTURE}.startswith({literal(bos)}) -%}}{{{{- {literal(bos)} -}}}}"
            f"{{%- endif -%}}{{{{- {CAPTURE} -}}}}")


def instruction_template(style) -> str:
    """A litgpt style as a template: the last user message split into instruction and input, the last system
    message as sys_prompt, each combination the style distinguishes rendered from its literal text and slots."""
    uses_input = "input" in slots_of(style.apply(SLOTS["instruction"], input=SLOTS["input"]), style)
    uses_system = "system" in slots_of(style.apply(SLOTS["instruction"], sys_prompt=SLOTS["system"]), style)
    name = type(style).__name__
    lines = [
        "{%- set ns = namespace(user=none, system=none) -%}",
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'user' -%}{%- set ns.user = message['content'] -%}",
        "{%- elif message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if ns.user is none -%}}{{{{- raise_exception({literal(f'the {name} prompt needs a user message')}) "
        "-}}{%- endif -%}",
        f"{{%- set parts = ns.user.split({literal(INPUT_SEPARATOR)}) -%}}",
        "{%- set instruction = parts[0] -%}",
        f"{{%- set input = parts[1:] | join({literal(INPUT_SEPARATOR)}) -%}}",
    ]
    # one branch per combination the style distinguishes, the most specific first; the last one unconditional
    branches = [(has_input, has_system) for has_input in (True, False) if uses_input or not has_input
                for has_system in (True, False) if uses_system or not has_system]
    for i, (has_input, has_system) in enumerate(branches):
        conditions = (["input"] if has_input else []) + (["ns.system is not none"] if has_system else [])
        if conditions:
            lines.append(f"{{%- {'elif' if i else 'if'} {' and '.join(conditions)} -%}}")
        elif i:
            lines.append("{%- else -%}")
        kwargs = {**({"input": SLOTS["input"]} if has_input else {}),
                  **({"sys_prompt": SLOTS["system"]} if has_system else {})}
        text = style.apply(SLOTS["instruction"], **kwargs)
        slots_of(text, style)
        lines.append("".join(f"{{{{- {EXPRESSIONS[piece] if piece in EXPRESSIONS else literal(piece)} -}}}}"
                             for piece in re.split(SLOT_PATTERN, text) if piece))
    if len(branches) > 1:
        lines.append("{%- endif -%}")
    return "\n".join(lines)


def slots_of(text: str, style) -> list[str]:
    """The slots ("instruction", "input", "system") a style's text rendered with the markers holds, each at most
    once; a style whose text repeats or drops the instruction cannot be written as a template."""
    slots = [name for marker in re.findall(SLOT_PATTERN, text) for name, m in SLOTS.items() if m == marker]
    if slots.count("instruction") != 1 or len(slots) != len(set(slots)):
        raise UserError(f"the {type(style).__name__} prompt style does not place the instruction once in its text; "
                        f"littune cannot write it as a chat template")
    return slots


def literal(text: str) -> str:
    """text as a Jinja string literal. Jinja decodes a literal with Python's unicode-escape codec (non-ASCII text
    stays as it is, backslash escapes are decoded), and llama.cpp's template engine reads the common escapes: only
    backslash, the quote and line breaks are escaped."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    return f'"{escaped}"'


def write_chat_template(folder: Path, template: str) -> None:
    """The template where transformers and other readers look for it: chat_template.jinja (transformers' first
    choice), tokenizer_config.json's chat_template, and chat_template.json where the base had one."""
    from littune.prompts import read_tokenizer_config

    folder = Path(folder)
    save_text(template, folder / "chat_template.jinja")
    config = read_tokenizer_config(folder)
    save_json({**config, "chat_template": template}, folder / "tokenizer_config.json")
    if (folder / "chat_template.json").is_file():
        save_json({"chat_template": template}, folder / "chat_template.json")
