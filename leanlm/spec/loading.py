"""Loading the draft of draft:MODEL (another checkpoint, same tokenizer) and self:QUANT (the
target's checkpoint again, its linear layers quantized; embedding, norms and, unless head=quant,
the LM head are the target's own tensors, shared rather than copied)."""
from __future__ import annotations

from types import SimpleNamespace

from leanlm.spec.config import SpecConfig
from leanlm.spec.draft_model import DraftModelProposer


def check_same_tokenizer(target_tok, draft_tok, target_path, draft_path) -> None:
    """Drafted ids are verified as the target's ids: the vocabularies must be identical."""
    a, b = target_tok.tok.get_vocab(with_added_tokens=True), draft_tok.tok.get_vocab(with_added_tokens=True)
    if a != b:
        only_a = sorted(set(a.items()) - set(b.items()))[:3]
        raise ValueError(f"draft model {str(draft_path)!r} does not share the target's tokenizer "
                         f"({str(target_path)!r}): vocabularies of {len(b)} vs {len(a)} tokens differ, "
                         f"e.g. target has {only_a}; a draft model must use the target's tokenizer")


def load_draft_proposer(spec: SpecConfig, engine) -> DraftModelProposer:
    from leanlm.engine.engine import weight_method_factory
    from leanlm.models.registry import load_model, resolve_model
    from leanlm.models.tokenizer import Tokenizer

    cfg = engine.config
    if spec.kind == "draft":
        path = resolve_model(spec.target)
        check_same_tokenizer(engine.tokenizer, Tokenizer.from_dir(path), engine.model_path, path)
        model, mc = load_model(path, cfg.torch_dtype, cfg.torch_device,
                               method=weight_method_factory(SimpleNamespace(
                                   torch_dtype=cfg.torch_dtype, torch_device=cfg.torch_device,
                                   quant_spec=None, quant_head=False)))
    else:  # self:QUANT
        from leanlm.quant.spec import QuantSpec

        quant = SimpleNamespace(torch_dtype=cfg.torch_dtype, torch_device=cfg.torch_device,
                                quant_spec=QuantSpec.parse(spec.target), quant_head=spec.quant_head)
        model, mc = load_model(engine.model_path, cfg.torch_dtype, cfg.torch_device,
                               method=weight_method_factory(quant))
        share_unquantized(engine.model, model, head=not spec.quant_head)
    from leanlm.spec.cost import relative_step_time, step_bytes

    proposer = DraftModelProposer(model, mc, engine.cache, engine.model_config.vocab_size, engine.sampler,
                                  name=spec.kind, conf=spec.conf)
    # measured where allowed (kernels differ in speed per byte: int8 widening, MKL vs packed)
    proposer.draft_cost = (relative_step_time(model, engine.model) if cfg.spec_calibrate
                           else step_bytes(model) / step_bytes(engine.model))
    return proposer


def share_unquantized(target, draft, head: bool = True) -> None:
    """Point the draft's embedding, norms and (unless the draft quantized it) LM head at the
    target's."""
    draft.embed_tokens = target.embed_tokens
    draft.norm = target.norm
    if head:
        draft.lm_head = target.lm_head
    for t, d in zip(target.layers, draft.layers):
        d.input_layernorm = t.input_layernorm
        d.post_attention_layernorm = t.post_attention_layernorm
