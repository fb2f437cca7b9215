"""One BERT for the auxiliary model and the student, plus the MLSM and MLM heads.

Parameter names match Hugging Face `BertModel` exactly, so HF checkpoints load without a key map
and our checkpoints load in `transformers` without one either.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlsm.core.errors import MLSMError

log = logging.getLogger(__name__)

# Student sizes from the MLSM paper's family; `medium` is the paper's student.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise MLSMError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it."
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise MLSMError(f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size}).")

    @classmethod
    def from_hf(cls, d: dict) -> BertConfig:
        """Read an HF config.json; refuse variants this BERT would silently compute wrongly."""
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise MLSMError(
                f"model_type {model_type!r} is not supported: only plain BERT ('bert') checkpoints load, "
                "because other families (RoBERTa, DistilBERT, ...) differ in positions or layer names."
            )
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise MLSMError(
                f"hidden_act {act!r} is not supported: this BERT implements only exact 'gelu'. "
                "Use a checkpoint trained with hidden_act='gelu'."
            )
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise MLSMError(
                f"position_embedding_type {pos!r} is not supported: only 'absolute' position embeddings are. "
                "Use a checkpoint with absolute positions."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """A config.json that `transformers.BertModel.from_pretrained` accepts as is."""
        d = dataclasses.asdict(self)
        d.update(
            model_type="bert",
            architectures=["BertModel"],
            hidden_act="gelu",
            position_embedding_type="absolute",
            use_cache=True,
            classifier_dropout=None,
        )
        return d

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> BertConfig:
        if name not in PRESETS:
            raise MLSMError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(vocab_size=vocab_size, **PRESETS[name])


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        if token_type_ids is None:
            # Row 0 broadcast instead of an all-zero index tensor: same result, one lookup fewer.
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout_p = c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        nh = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, nh, H // nh).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        return y.transpose(1, 2).reshape(B, T, H)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, as HF "gelu"


class BertOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertStack(nn.Module):
    """Holds the blocks under the name `encoder.layer.{i}` that HF checkpoints use."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))


def init_bert_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B,T) padding mask → (B,1,1,T) boolean SDPA mask, or None when nothing is padded.

    None lets SDPA pick its fastest (flash) kernel. A row with no real token at all attends
    everywhere instead of nowhere, so it yields finite garbage rather than NaN.
    """
    if attention_mask is None:
        return None
    m = attention_mask.bool()
    if not torch.compiler.is_compiling() and bool(m.all()):  # a host sync; under compile, keep one graph
        return None
    m = m | ~m.any(dim=-1, keepdim=True)
    return m[:, None, None, :]


class BertEncoder(nn.Module):
    """BERT without the pooler: the auxiliary model and the student's body."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertStack(config)
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        num_layers: int | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run blocks 1..num_layers only (deeper ones would be wasted FLOPs for the aux model).

        Returns h_num_layers (B,T,H), or with `output_hidden_states` the list [h0, ..., h_num_layers]
        in HF numbering (h0 = embedding output).
        """
        L = self.config.num_hidden_layers
        n = L if num_layers is None else num_layers
        if not 0 <= n <= L:
            raise MLSMError(f"layer {n} does not exist: this model has layers 0..{L} (0 = embeddings).")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise MLSMError(
                f"sequence length {T} exceeds max_position_embeddings {self.config.max_position_embeddings}; "
                "use a shorter --max-len."
            )
        mask = _key_mask(attention_mask)
        h = self.embeddings(input_ids, token_type_ids)
        states = [h]
        for block in self.encoder.layer[:n]:
            h = block(h, mask)
            if output_hidden_states:
                states.append(h)
        return states if output_hidden_states else h


class HeadTransform(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLSMHead(nn.Module):
    """Predicts the K-way latent-atom distribution (as logits)."""

    def __init__(self, c: BertConfig, num_atoms: int):
        super().__init__()
        self.transform = HeadTransform(c)
        self.decoder = nn.Linear(c.hidden_size, num_atoms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class MLMHead(nn.Module):
    """Vocabulary logits; the decoder weight is the word-embedding matrix itself (tied)."""

    def __init__(self, c: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = HeadTransform(c)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class Student(nn.Module):
    def __init__(self, config: BertConfig, num_atoms: int | None, mlm: bool):
        super().__init__()
        if num_atoms is None and not mlm:
            raise MLSMError("the student needs at least one objective: give num_atoms (MLSM) or enable MLM.")
        self.config = config
        self.encoder = BertEncoder(config)
        self.mlsm_head = MLSMHead(config, num_atoms) if num_atoms is not None else None
        self.mlm_head = MLMHead(config, self.encoder.embeddings.word_embeddings) if mlm else None
        for head in (self.mlsm_head, self.mlm_head):
            if head is not None:
                head.transform.apply(lambda m: init_bert_weights(m, config.initializer_range))
        if self.mlsm_head is not None:
            init_bert_weights(self.mlsm_head.decoder, config.initializer_range)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, masked_index: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """`masked_index` holds flat indices into the B*T positions; heads see only those rows.

        Gathering before projecting keeps the K- and V-sized matmuls to ~15% of the tokens.
        """
        h = self.encoder(input_ids, attention_mask)
        sel = h.reshape(-1, h.shape[-1]).index_select(0, masked_index)
        return {
            "mlsm_logits": self.mlsm_head(sel) if self.mlsm_head is not None else None,
            "mlm_logits": self.mlm_head(sel) if self.mlm_head is not None else None,
        }

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """HF BertModel names, loadable by `transformers` as is."""
        return dict(self.encoder.state_dict())

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Head weights, without the tied decoder (it is the word-embedding matrix)."""
        out: dict[str, torch.Tensor] = {}
        for name in ("mlsm_head", "mlm_head"):
            head = getattr(self, name)
            if head is None:
                continue
            for k, v in head.state_dict().items():
                if name == "mlm_head" and k == "decoder.weight":
                    continue
                out[f"{name}.{k}"] = v
        return out
