#!/usr/bin/env python3
"""Writes crates/model/tests/fixtures/chat_templates/: chat templates rendered by HF transformers'
own `apply_chat_template` (Jinja2 in its sandbox, with transformers' globals and `tojson`), which
crates/model/tests/chat.rs compares whale's renderer (MiniJinja) against, text for text, and the
ids `apply_chat_template(tokenize=True)` gives.

Templates:
- `deepseek_r1`: the template DeepSeek-R1 and its distilled Qwen/Llama models ship in
  tokenizer_config.json (the reply's reasoning dropped from earlier turns, `<think>\\n` opened
  after the generation prompt);
- `chatml`: a Qwen2.5-style ChatML template with a default system prompt;
- `features`: one written here to reach what templates use: namespace(), loop controls, macros,
  Python string methods, `tojson` with its keywords, `raise_exception`, trim_blocks/lstrip_blocks,
  loop variables, tests and filters, values printed as Python prints them;
- `line_endings`: `\r\n` and `\r` line endings and a final newline;
- `generation`: transformers' `{% generation %}` blocks (its AssistantTracker, which training
  templates use to mark the assistant's tokens), with whitespace control on either side, a `set`
  inside that must not outlive the block, the enclosing loop read from inside it, and the tag's
  text in a comment, a string and a raw block, where it is no tag.

`checkpoint/` is the `chatml` template saved by `tokenizer.save_pretrained` (transformers 5
writes chat_template.jinja beside tokenizer_config.json), over the Qwen2-style tokenizer of
tests/fixtures/tokenizer_qwen2 given a post-processor that adds a BOS (which `apply_chat_template`
leaves out), so `ChatTemplate::from_dir` and `tokenizer_for` read what transformers writes.

Run once from the repo root (CI never does): .venv/bin/python scripts/make_chat_reference.py
"""

import json
import os
import shutil

import jinja2
from provenance import stamp
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "chat_templates")

DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']"
    " + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json'"
    " + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

CHATML = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Block tags on lines of their own (trim_blocks and lstrip_blocks decide the whitespace), and
# the constructs chat templates reach for.
FEATURES = """{% macro turn(role, text) %}
[{{ role | upper }}] {{ text | trim }}
{% endmacro %}
{% set ns = namespace(users=0, last_user=-1) %}
{% for m in messages %}
    {% if m.role == 'user' %}
        {% set ns.users = ns.users + 1 %}
        {% set ns.last_user = loop.index0 %}
    {% endif %}
{% endfor %}
{{ bos_token }}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + m.role) }}
    {% endif %}
    {% if m.role == 'system' %}
        {% if not loop.first %}
            {{ raise_exception('The system message must come first') }}
        {% endif %}
        {% continue %}
    {% endif %}
    {% if m.content.startswith('STOP') %}
        {% break %}
    {% endif %}
    {% set parts = m.content.split('</think>') %}
    {% if m.role == 'assistant' and parts | length > 1 and loop.index0 < ns.last_user %}
{{ turn(m.role, parts[-1]) }}
    {% else %}
{{ turn(m.role, m.content.replace('  ', ' ')) }}
    {% endif %}
    {% if loop.last and m.role == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
meta: {{ {'users': ns.users, 'first': messages[0].role, 'text': messages[-1].content[:12], 'ratio': 0.25, 'tools': tools} | tojson }}
indented: {{ messages[0] | tojson(indent=2) }}
sorted: {{ {'b': [1, 2.5, none, true], 'a': 'é"\\\\/'} | tojson(sort_keys=true, separators=[',', ':']) }}
ascii: {{ messages[-1].content | tojson(ensure_ascii=true) }}
reprs: {{ none }} {{ true }} {{ [1, 'a', none, 2.5, "it's"] }} {{ {'k': false, 'q': 'say "hi"\\n'} }} {{ 1e20 }} {{ 7 // 2 }} {{ 7 / 2 }} {{ tools }}
count: {{ messages | length }} {{ messages | map(attribute='role') | join(',') }} {{ messages[-1].content.strip().count('a') }}
{% if add_generation_prompt %}
[ASSISTANT]{% if documents is none %} (no documents){% endif %}

{% endif %}
"""

# Windows line endings (Jinja2 reads \r\n and \r as \n) and a final newline (dropped).
LINE_ENDINGS = "{{ bos_token }}x\r\n{% for m in messages %}\r\n  {{ m.content }}\r{% endfor %}\r\n{{ 'a\r\nb' }}\nend\n"

# A ChatML template of the kind TRL's assistant-only loss asks for: the reply in a generation block.
GENERATION = """{# a comment's {% is no tag #}{{ '{%}' }}{% raw %}{% generation %} stays{% endraw %}
{% set reply = 'none yet' %}
{% for message in messages %}
{% if message.role == 'assistant' %}
{{ '<|im_start|>assistant\\n' }}
{%- generation -%}
{% set reply = message.content.split('</think>')[-1] %}
  {{ reply }}{% if loop.last %} (last){% endif %}{{ '<|im_end|>' }}
{%- endgeneration %}

{% else %}
{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{% endif %}
{% endfor %}
{%+ generation %}[{{ reply }}{% set reply = 'set inside' %}, {{ reply }}]{% endgeneration -%}
    {{ reply }}
    {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
"""

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 12+7?"}],
    "system_user": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 12+7?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is 12+7?"},
        {"role": "assistant", "content": "<think>\n2+7=9, 1+0=1\n</think>\n\n19"},
        {"role": "user", "content": "And  12+8, please?  "},
        {"role": "assistant", "content": "<think>carry</think>20"},
    ],
    "unicode_quotes": [
        {"role": "user", "content": 'Say "naïve café" — 数学 🙂 and a \\ backslash\tand tab.'},
    ],
    "stop_early": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "STOP here"},
        {"role": "user", "content": "never rendered"},
    ],
    "bad_role": [{"role": "narrator", "content": "Once upon a time"}],
    "late_system": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "too late"},
    ],
}

TEMPLATES = {
    "deepseek_r1": (DEEPSEEK_R1, ["user", "system_user", "multi_turn", "unicode_quotes"]),
    "chatml": (CHATML, ["user", "system_user", "multi_turn", "unicode_quotes"]),
    "features": (FEATURES, list(CONVERSATIONS)),
    "line_endings": (LINE_ENDINGS, ["multi_turn"]),
    "generation": (GENERATION, ["user", "multi_turn"]),
}

QWEN2_TOKENIZER = os.path.join(FIXTURES, "tokenizer_qwen2", "tokenizer.json")
SPECIAL = {"bos_token": "<answer>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def tokenizer(template):
    """The Qwen2-style fixture tokenizer with a post-processor that adds the BOS, as Llama 3's and
    R1-Distill's do: `tokenizer(text)` adds it, `apply_chat_template` must not (the template
    writes `bos_token` itself)."""
    inner = Tokenizer.from_file(QWEN2_TOKENIZER)
    bos = SPECIAL["bos_token"]
    inner.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, inner.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=inner, chat_template=template, **SPECIAL)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    templates = []
    for name, (source, conversations) in TEMPLATES.items():
        tok = tokenizer(source)
        cases = []
        for conv in conversations:
            for add_generation_prompt in (False, True):
                case = {"conversation": conv, "add_generation_prompt": add_generation_prompt}
                try:
                    case["rendered"] = tok.apply_chat_template(
                        CONVERSATIONS[conv], tokenize=False, add_generation_prompt=add_generation_prompt
                    )
                    ids = tok.apply_chat_template(
                        CONVERSATIONS[conv], tokenize=True, add_generation_prompt=add_generation_prompt
                    )
                    case["ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                cases.append(case)
        templates.append({"name": name, "source": source, "cases": cases})
    # What transformers writes for a checkpoint: tokenizer.json, tokenizer_config.json (the
    # special tokens) and chat_template.jinja.
    tokenizer(CHATML).save_pretrained(os.path.join(OUT, "checkpoint"))
    expected = {
        "special_tokens": SPECIAL,
        "conversations": CONVERSATIONS,
        "templates": templates,
        "provenance": stamp(__file__, ["transformers", "jinja2"]),
    }
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for t in templates:
        errors = sum("error" in c for c in t["cases"])
        print(f"{t['name']}: {len(t['cases'])} cases, {errors} errors")


if __name__ == "__main__":
    main()
