"""How attention is computed: processors, in the spirit of diffusers' attention processors.

Each attention module (the spatial ``AttentionBlock``, the classifier's ``AttentionPool2d``, the
HAE ``MultiScaleSparseTransformer``) holds its weights and a *processor*, a weightless object
that computes the attention from them. A module class names the processor type it accepts and
its built-in processors (``"reference"``: upstream's materialised computation; ``"fused"``: the
same function without L×L or B×D×D tensors). A model sets them all at once:

    model.set_attention_impl("fused")                       # the built-in family, every module
    model.set_attn_processor(MyProcessor())                 # every module that accepts it
    model.set_attn_processor({"middle_block.1": "reference", ...})   # per module name

Anything a processor needs once per forward (the reference spatial processor: upstream's
materialised ``c cᵀ``) it builds in ``prepare``, which the model calls before running any
(possibly checkpointed) block.
"""

from __future__ import annotations

from typing import Dict, Mapping, Type, Union


class AttentionProcessor:
    """Computes one attention module's output from the module's weights; holds no weights.

    ``name`` identifies the computation (``model.attention_impl`` reports it). Subclasses define
    ``__call__`` with the signature their module kind uses.
    """

    name = "custom"

    def prepare(self, cond) -> None:
        """Called once per forward with the forward's ``Conditioning`` (or None), outside any
        checkpointed block: build here what this processor shares across layers."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


ProcessorSpec = Union[str, AttentionProcessor]


class HoldsAttentionProcessor:
    """Mixin for an attention module: ``processor_type`` it accepts, its ``builtin_processors``."""

    processor_type: Type[AttentionProcessor] = AttentionProcessor
    builtin_processors: Mapping[str, Type[AttentionProcessor]] = {}

    def set_processor(self, processor: ProcessorSpec) -> None:
        if isinstance(processor, str):
            if processor not in self.builtin_processors:
                raise ValueError(
                    f"unknown attention processor {processor!r} for {type(self).__name__}; "
                    f"built in: {', '.join(sorted(self.builtin_processors))}"
                )
            processor = self.builtin_processors[processor]()
        if not isinstance(processor, self.processor_type):
            raise TypeError(
                f"{type(self).__name__} needs a {self.processor_type.__name__}, got {type(processor).__name__}"
            )
        self.processor = processor

    def accepts(self, processor: AttentionProcessor) -> bool:
        return isinstance(processor, self.processor_type)


class AttentionProcessorsMixin:
    """Model-wide view and setter of the processors of every attention module below the model."""

    def attention_modules(self) -> Dict[str, HoldsAttentionProcessor]:
        return {name: m for name, m in self.named_modules() if isinstance(m, HoldsAttentionProcessor)}

    @property
    def attn_processors(self) -> Dict[str, AttentionProcessor]:
        """Module name -> its processor."""
        return {name: m.processor for name, m in self.attention_modules().items()}

    def set_attn_processor(self, processor: Union[ProcessorSpec, Mapping[str, ProcessorSpec]]) -> None:
        """Install processors: a built-in name (on every module), one processor (on every module
        that accepts it; at least one must), or a dict from module name to either."""
        modules = self.attention_modules()
        if isinstance(processor, Mapping):
            unknown = sorted(set(processor) - set(modules))
            if unknown:
                raise ValueError(f"no attention module named {unknown}; attention modules: {sorted(modules)}")
            for name, spec in processor.items():
                modules[name].set_processor(spec)
            return
        if isinstance(processor, str):
            names = set.intersection(*(set(m.builtin_processors) for m in modules.values())) if modules else set()
            if processor not in names:
                raise ValueError(f"attention_impl must be one of {sorted(names)}, got {processor!r}")
            for m in modules.values():
                m.set_processor(processor)
            return
        accepting = [m for m in modules.values() if m.accepts(processor)]
        if not accepting:
            kinds = sorted({m.processor_type.__name__ for m in modules.values()})
            raise TypeError(f"no attention module of this model accepts a {type(processor).__name__} (needs one of {kinds})")
        for m in accepting:
            m.set_processor(processor)

    def set_attention_impl(self, impl: str) -> None:
        """The built-in processors of one family: ``"reference"`` (materialised) or ``"fused"``."""
        self.set_attn_processor(impl)

    @property
    def attention_impl(self) -> str:
        """The processors' common name, or ``"mixed"``."""
        names = {p.name for p in self.attn_processors.values()}
        return names.pop() if len(names) == 1 else "mixed"

    def prepare_attention(self, cond) -> None:
        """Let every distinct processor prepare for this forward (see ``AttentionProcessor.prepare``)."""
        seen = set()
        for m in self.attention_modules().values():
            if id(m.processor) not in seen:
                seen.add(id(m.processor))
                m.processor.prepare(cond)


__all__ = ["AttentionProcessor", "HoldsAttentionProcessor", "AttentionProcessorsMixin", "ProcessorSpec"]
