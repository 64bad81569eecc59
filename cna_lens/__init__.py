"""cna_lens: Contrastive Neuron Attribution (CNA) for refusal in chat LLMs, on TransformerLens.

model = cna_lens.load_model("qwen2.5-coder-1.5b-instruct")
attr = cna_lens.attribute(model, harmful, harmless)      # final-token hook_post statistics
neurons = attr.top_neurons(fraction=0.001)                # global top 0.1 %, layers 0-1 excluded
with cna_lens.edit_weights(model, neurons, scale=0.0):    # zero them (down_proj columns, restored on exit)
    texts = cna_lens.generate(model, prompts)                # stock HF generate on the edited weights
with cna_lens.ablate(model, neurons, scale=0.0):          # the same as TransformerLens hooks
    texts = cna_lens.generate(model, prompts)                # TransformerLens' generate
verdicts = cna_lens.judge_completions(prompts, texts)      # refuse / comply / evade
"""

from .attribute import (
    Attribution,
    attribute,
    attribute_multi,
    attribute_tokens,
    final_token_activations,
    hook_name,
)
from .edit import edit_direction, edit_steering, edit_weights
from .export import export_model
from .generation import generate, generate_many, greedy_tokens
from .intervene import ablate, ablate_direction, neuron_hooks, steer, steering_hooks
from .judge import Verdict, judge_completions
from .models import PACKAGED, load_model
from .neurons import NeuronSet
from .prompts import encode, format_prompt

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "NeuronSet",
    "PACKAGED",
    "Verdict",
    "ablate",
    "ablate_direction",
    "attribute",
    "attribute_multi",
    "attribute_tokens",
    "edit_direction",
    "edit_steering",
    "edit_weights",
    "encode",
    "export_model",
    "final_token_activations",
    "format_prompt",
    "generate",
    "generate_many",
    "greedy_tokens",
    "hook_name",
    "judge_completions",
    "load_model",
    "neuron_hooks",
    "steer",
    "steering_hooks",
]
