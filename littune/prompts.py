"""Prompt styles: litgpt's named styles (alpaca, ...) and `chat`, the model's own chat template, and their file.

A record's prompt is `style.apply(instruction, input=input)`. The chat style renders the model's chat template
(tokenizer_config.json's `chat_template` or chat_template.jinja) as transformers' `apply_chat_template` renders it,
in a sandboxed Jinja environment. A style is stored beside prepared data and trained runs as prompt_style.yaml
(`save_style`) in litgpt's format (`class_path`) plus `init_args` for a chat template, and read back by
`load_style_file`, which builds only littune's ChatTemplate and litgpt.prompts classes (never an arbitrary import).
"""

import functools
import json
import re
from pathlib import Path
from typing import Any, Optional

import jinja2
import jinja2.ext
import yaml

from littune.common import UserError, first_line, json_type, save_text
from littune.prepared import load_tokenizer

CHAT_STYLE = "chat"
STYLE_FILE = "prompt_style.yaml"
# the class path prompt_style.yaml stores for a chat template; files written before prompts.py had its own module
# name littune.data.ChatTemplate and still load
CHAT_TEMPLATE_CLASS_PATHS = ("littune.prompts.ChatTemplate", "littune.data.ChatTemplate")
CHAT_TEMPLATE_ARGS = ("template", "bos_token", "eos_token", "system", "strip_bos")
# the assistant's answer in the conversation rendered to find what the template writes after an answer
ANSWER_MARKER = "LITTUNE_ANSWER_f3a9"
# a special-token-looking text right after the answer: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>,
# <｜end▁of▁sentence｜>
END_OF_TURN = re.compile(r"<[^<>\s]{1,64}>")


def style_by_name(name: str, checkpoint_dir: Path, system: Optional[str] = None, *, tokenizer=None,
                  tokenizer_config: Optional[dict] = None):
    """The prompt style called `name`: "chat" (the checkpoint's own chat template) or a litgpt style name.

    `system` (a system message) only goes with "chat". `tokenizer`, `tokenizer_config`: the checkpoint's litgpt
    Tokenizer and tokenizer_config.json if already loaded (chat needs to know whether it adds BOS itself).
    """
    check_style_name(name, system)
    if name == CHAT_STYLE:
        return chat_style(Path(checkpoint_dir), system, tokenizer, tokenizer_config)
    from litgpt.prompts import PromptStyle

    return PromptStyle.from_name(name)


def choose_prompt_style(name: Optional[str], run_dir: Optional[Path], checkpoint_dir: Path, system: Optional[str],
                        *, tokenizer=None, tokenizer_config: Optional[dict] = None):
    """The prompt style of generate and serve: --prompt_style; else the style the adapter was trained with (saved in
    its run folder, or in a folder made by `littune merge`); else the model's chat template where it has one; else
    alpaca. `tokenizer`, `tokenizer_config`: as `style_by_name`'s (read here where not given, once each)."""
    checkpoint_dir = Path(checkpoint_dir)
    if name:
        return style_by_name(name, checkpoint_dir, system, tokenizer=tokenizer, tokenizer_config=tokenizer_config)
    for folder in (run_dir, checkpoint_dir):
        if folder is not None and (Path(folder) / STYLE_FILE).is_file():
            return load_style_file(folder)
    config = tokenizer_config if tokenizer_config is not None else read_tokenizer_config(checkpoint_dir)
    return style_by_name(default_style_name(checkpoint_dir, config), checkpoint_dir, system, tokenizer=tokenizer,
                         tokenizer_config=config)


def check_style_name(name: str, system: Optional[str]) -> None:
    from litgpt.prompts import prompt_styles

    if name != CHAT_STYLE and name not in prompt_styles:
        raise UserError(f"--prompt_style {name!r} is not a prompt style; choose {CHAT_STYLE} (the model's chat "
                        f"template) or a litgpt style: {', '.join(prompt_styles)}")
    if system is not None and name != CHAT_STYLE:
        raise UserError(f"--system goes with --prompt_style {CHAT_STYLE}; litgpt's {name!r} style has its own fixed "
                        f"text")


def save_style(style, folder: Path) -> None:
    """Write folder/prompt_style.yaml atomically: litgpt's format (class_path) plus init_args for a chat template."""
    save_text(style_yaml(style), Path(folder) / STYLE_FILE)


def load_style_file(folder: Path):
    """The prompt style of folder/prompt_style.yaml, written by `save_style` or by litgpt's `save_prompt_style`.

    Only littune's ChatTemplate and the classes of litgpt.prompts are built: the file names a class to instantiate,
    and importing whatever module a data folder names would run code from it.
    """
    path = Path(folder) / STYLE_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {STYLE_FILE}; prepare the data with littune prepare, which writes it")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid YAML ({first_line(e)}); re-run littune prepare") from e
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        raise UserError(f"{path}: expected 'class_path: MODULE.CLASS' (and init_args); re-run littune prepare")
    init_args = config.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise UserError(f"{path}: init_args must be a mapping, got {json_type(init_args)}; re-run littune prepare")
    return style_from_class_path(config["class_path"], init_args, path)


def style_yaml(style) -> str:
    """prompt_style.yaml's text: litgpt's `class_path`, plus `init_args` for a style that carries data (a chat
    template), which litgpt's `save_prompt_style` would drop."""
    cls = type(style)
    config: dict[str, Any] = {"class_path": f"{cls.__module__}.{cls.__name__}"}
    if isinstance(style, ChatTemplate):
        config["init_args"] = style.init_args()
    # multi-line text as a block and no folding of long lines, so the file reads as the template does
    return yaml.dump(config, Dumper=BlockTextDumper, sort_keys=False, allow_unicode=True, width=1 << 30)


class BlockTextDumper(yaml.SafeDumper):
    """safe_dump that writes multi-line strings as `|` blocks (PyYAML falls back to quotes where a block would not
    read back exactly, e.g. trailing spaces)."""


BlockTextDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)
)


def style_from_class_path(class_path: str, init_args: dict, path: Path):
    module_name, _, class_name = class_path.rpartition(".")
    if class_path in CHAT_TEMPLATE_CLASS_PATHS:
        unknown = sorted(set(init_args) - set(CHAT_TEMPLATE_ARGS))
        if unknown or not isinstance(init_args.get("template"), str):
            raise UserError(f"{path}: a chat template style needs init_args with a template string and only "
                            f"{', '.join(CHAT_TEMPLATE_ARGS)}; re-run littune prepare")
        return ChatTemplate(**init_args)
    if module_name == "litgpt.prompts":
        import litgpt.prompts

        cls = getattr(litgpt.prompts, class_name, None)
        if isinstance(cls, type) and issubclass(cls, litgpt.prompts.PromptStyle):
            try:
                return cls(**init_args)
            except TypeError as e:
                raise UserError(f"{path}: cannot build {class_path} from init_args ({first_line(e)})") from e
    raise UserError(f"{path}: unknown prompt style class {class_path!r}; littune reads litgpt.prompts styles and "
                    f"{CHAT_TEMPLATE_CLASS_PATHS[0]}; re-run littune prepare")


class ChatTemplate:
    """A model's own chat template (Jinja, as on the Hub) as a prompt style: litgpt's PromptStyle interface (apply,
    stop_tokens), without subclassing it (importing litgpt takes seconds; this module stays light to import).

    The prompt is the conversation [system (when given), user: instruction + "\\n\\n" + input] rendered with
    add_generation_prompt=True, exactly as transformers' `apply_chat_template(..., tokenize=False)` renders it; with
    strip_bos (litgpt's Tokenizer adds BOS itself) a leading BOS text is dropped, or it would be doubled.
    """

    def __init__(self, template: str, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 system: Optional[str] = None, strip_bos: bool = False):
        self.template, self.bos_token, self.eos_token = template, bos_token, eos_token
        self.system, self.strip_bos = system, bool(strip_bos)
        compile_chat_template(template)  # a broken template fails now, not at the first record

    def init_args(self) -> dict:
        return {name: getattr(self, name) for name in CHAT_TEMPLATE_ARGS}

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.init_args() == self.init_args()

    __hash__ = None  # mutable attributes; equal by value

    def __repr__(self) -> str:
        return f"ChatTemplate(system={self.system!r}, bos_token={self.bos_token!r}, strip_bos={self.strip_bos})"

    def apply(self, prompt: str, *, sys_prompt: Optional[str] = None, input: str = "", **kwargs: str) -> str:
        system = sys_prompt if sys_prompt is not None else self.system
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt + (f"\n\n{input}" if input else "")})
        text = self.render(messages, add_generation_prompt=True)
        if self.strip_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        special_tokens = {name: value for name, value in (("bos_token", self.bos_token),
                                                           ("eos_token", self.eos_token)) if value is not None}
        return render_chat_template(self.template, messages, add_generation_prompt, special_tokens)

    def end_of_turn(self) -> Optional[str]:
        """The special token the template writes right after an assistant answer (<|im_end|> for ChatML), or None
        when it writes none or cannot render an answer."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": "user", "content": "?"}, {"role": "assistant", "content": ANSWER_MARKER}]
        try:
            text = self.render(messages, add_generation_prompt=False)
        except UserError:  # a template that refuses this conversation: no end-of-turn token known
            return None
        _, found, after = text.partition(ANSWER_MARKER)
        match = END_OF_TURN.match(after.lstrip()) if found else None
        return match.group() if match else None

    def stop_tokens(self, tokenizer) -> tuple[list[int], ...]:
        """EOS, and the end-of-turn token where the template has one in this vocabulary (chat models end their
        answer with it, often never with EOS)."""
        stops = [[tokenizer.eos_id]]
        marker = self.end_of_turn()
        marker_id = token_id(tokenizer, marker) if marker is not None else None
        if marker_id is not None and [marker_id] not in stops:
            stops.append([marker_id])
        return tuple(stops)


def token_id(tokenizer, token: str) -> Optional[int]:
    """The id of `token` when it is one token of the vocabulary, else None."""
    try:
        found = tokenizer.token_to_id(token)
    except ValueError:  # litgpt: not in the Hugging Face vocabulary
        return None
    if tokenizer.backend == "sentencepiece" and found == tokenizer.processor.unk_id():
        return None  # SentencePiece answers an unknown piece with <unk>'s id
    return found


def chat_style(checkpoint_dir: Path, system: Optional[str], tokenizer=None, config: Optional[dict] = None):
    """The checkpoint's chat template (chat_template.jinja, else tokenizer_config.json's chat_template) as a style;
    `tokenizer` and `config` (tokenizer_config.json) where the caller has them."""
    config = config if config is not None else read_tokenizer_config(checkpoint_dir)
    template, source = read_chat_template(checkpoint_dir, config)
    if template is None:
        raise UserError(
            f"{checkpoint_dir}: --prompt_style {CHAT_STYLE} needs the model's chat template, and it has none (no "
            f"chat_template in tokenizer_config.json, no chat_template.jinja); use an instruct model's checkpoint or "
            f"a litgpt style, e.g. --prompt_style alpaca"
        )
    compile_chat_template(template, source)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint_dir)
    return ChatTemplate(
        template, bos_token=special_token_text(config.get("bos_token")),
        eos_token=special_token_text(config.get("eos_token")), system=system, strip_bos=tokenizer.use_bos,
    )


def has_chat_template(checkpoint_dir: Path, tokenizer_config: Optional[dict] = None) -> bool:
    checkpoint_dir = Path(checkpoint_dir)
    config = tokenizer_config if tokenizer_config is not None else read_tokenizer_config(checkpoint_dir)
    return read_chat_template(checkpoint_dir, config)[0] is not None


def default_style_name(checkpoint_dir: Path, tokenizer_config: Optional[dict] = None) -> str:
    """The prompt style when none is asked for: an instruction model answers best in its own chat template.
    `tokenizer_config`: tokenizer_config.json where the caller has read it."""
    return CHAT_STYLE if has_chat_template(checkpoint_dir, tokenizer_config) else "alpaca"


def read_tokenizer_config(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({first_line(e)})") from e
    return config if isinstance(config, dict) else {}


def read_chat_template(checkpoint_dir: Path, config: dict) -> tuple[Optional[str], str]:
    """(template text or None, where it comes from). transformers gives chat_template.jinja priority; a list of
    named templates in tokenizer_config.json contributes its "default" one."""
    jinja_path = checkpoint_dir / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    source = f"{checkpoint_dir / 'tokenizer_config.json'} (chat_template)"
    return (template if isinstance(template, str) and template.strip() else None), source


def special_token_text(value: Any) -> Optional[str]:
    """A special token of tokenizer_config.json: a string, or an AddedToken object with its text in "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers defines to mark assistant text: rendered as its
    body (templates with it must compile here too; littune needs no masks from it)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str, source: str = "the chat template"):
    """The template compiled as transformers compiles it: sandboxed (a template from the Hub must not reach Python
    objects), trim_blocks and lstrip_blocks, with its tojson, raise_exception and strftime_now."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{source}: not a valid Jinja template (line {e.lineno}: {e.message})") from e


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict) -> str:
    try:
        return compile_chat_template(template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except Exception as e:  # the template is the model's code: whatever it raises is a fault of the template
        raise UserError(f"the model's chat template failed ({type(e).__name__}: {first_line(e)})") from e


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # as transformers: Jinja's own tojson escapes HTML characters, which a prompt must not get
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(format)
