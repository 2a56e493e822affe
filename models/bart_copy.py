"""BART with a copy mechanism: a pointer-generator (See et al. 2017) on Hugging Face's BartForConditionalGeneration.
This file imports only torch and transformers, so that an export carries it (``save_pretrained`` copies it beside the
weights and writes ``auto_map`` into config.json) and loads WITHOUT this repository::

    AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)   # logits = log-probabilities [B, T, V]

At every target position t the model mixes two distributions over the vocabulary:

    p(w) = g_t * softmax(lm_head(h_t) + final_logits_bias)(w) + (1 - g_t) * sum_{s: x_s = w} a_ts

h_t is the decoder's final hidden state, a_t a single-head attention over the encoder's final states (its own query
and key projections, pad positions masked), x the source token ids, and g_t = sigmoid(w . [h_t; sum_s a_ts e_s]) the
generation gate.  The second term copies source tokens: from the first step it is an input-dependent distribution
(at initialisation, roughly the source's bag of words), and its gradient trains the copy attention directly.  That
is what lets a small model trained from scratch on a few thousand dialogues write summaries about THIS dialogue's
speakers and objects, where a plain BART of the same size first learns a language model of summaries that ignores
its input (results/summarization_samsum).

``forward`` returns the log of that mixture as ``logits`` (float32; log-probabilities are valid logits: softmax,
log_softmax, cross-entropy and HF ``generate``'s beam search give the same numbers) and, with ``labels`` (-100 or
pad ignored), their mean NLL as ``loss``.  The source ids reach ``generate``'s later steps inside the encoder output
(``CopyEncoderOutput.source_ids``), which ``generate`` expands for beams like the encoder states.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BartConfig, BartForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import BartEncoder


class BartCopyConfig(BartConfig):
    """BartConfig of a pointer-generator BART (the copy layers add 2 d^2 + 4 d + 1 parameters)."""
    model_type = "bart_copy"


@dataclass
class CopyEncoderOutput(BaseModelOutput):
    """The encoder's output plus the source ids the copy distribution scatters onto."""
    source_ids: Tensor | None = None


class BartCopyEncoder(BartEncoder):
    """BART's encoder, returning the source ids with its states (no parameters of its own)."""

    def forward(self, input_ids=None, *args, **kwargs):
        out = super().forward(input_ids, *args, **kwargs)
        return CopyEncoderOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                                 attentions=out.attentions, source_ids=input_ids)


class BartCopyForConditionalGeneration(BartForConditionalGeneration):
    config_class = BartCopyConfig

    def __init__(self, config: BartCopyConfig):
        super().__init__(config)
        self.model.encoder.__class__ = BartCopyEncoder   # same weights; the forward also returns the source ids
        d = config.d_model
        self.copy_query = nn.Linear(d, d)
        self.copy_key = nn.Linear(d, d)
        self.copy_gate = nn.Linear(2 * d, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, labels=None, use_cache=None, features_only=False,
                logits_to_keep=0, **kwargs):
        if features_only:
            raise ValueError("the copy model's output distribution needs the source: it has no features-only "
                             "forward (the fused loss does not apply)")
        if labels is not None and decoder_input_ids is None:
            from transformers.models.bart.modeling_bart import shift_tokens_right
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                   self.config.decoder_start_token_id)
        if encoder_outputs is None:
            encoder_outputs = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        source = getattr(encoder_outputs, "source_ids", None)
        if source is None:
            source = input_ids
        if source is None:
            raise ValueError("pass input_ids (or encoder_outputs from this model's encoder, which carry them)")
        out = self.model(attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                         cache=cache, use_cache=use_cache, return_dict=True)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.copy_log_probs(hidden, encoder_outputs.last_hidden_state, source, attention_mask)
        loss = None
        if labels is not None:
            target = labels.masked_fill(labels.eq(self.config.pad_token_id), -100)
            loss = F.nll_loss(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, cache=out.cache,
                               decoder_hidden_states=out.decoder_hidden_states,
                               decoder_attentions=out.decoder_attentions, cross_attentions=out.cross_attentions,
                               encoder_last_hidden_state=encoder_outputs.last_hidden_state)

    def copy_log_probs(self, hidden: Tensor, enc: Tensor, source: Tensor, source_mask: Tensor | None) -> Tensor:
        """log p(w) of the mixture, [B, T, V] float32, for decoder states ``hidden`` [B, T, d] over encoder states
        ``enc`` [B, S, d] of source ids ``source`` [B, S] (``source_mask`` 1 = real token)."""
        hidden, enc = hidden.float(), enc.float()
        vocab = F.softmax(self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
                          + self.final_logits_bias.float(), dim=-1)
        q = self.copy_query(hidden.to(self.copy_query.weight.dtype)).float()
        k = self.copy_key(enc.to(self.copy_key.weight.dtype)).float()
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])                       # [B, T, S]
        keep = source.ne(self.config.pad_token_id) if source_mask is None else source_mask.bool()
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        attn = F.softmax(scores, dim=-1)
        context = attn @ enc                                                             # [B, T, d]
        gate = torch.sigmoid(self.copy_gate(torch.cat([hidden, context], -1).to(self.copy_gate.weight.dtype))
                             .float())                                                  # [B, T, 1]
        copy = torch.zeros_like(vocab).scatter_add_(-1, source[:, None, :].expand(-1, hidden.shape[1], -1), attn)
        return torch.log((gate * vocab + (1 - gate) * copy).clamp_min(1e-12))

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BartCopyForConditionalGeneration) and hasattr(module, "copy_gate"):
            from transformers import initialization as init
            init.zeros_(module.copy_gate.bias)          # start half-and-half between generating and copying


# save_pretrained copies this file into the export and writes config.json's auto_map, so that
# AutoConfig / AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True) load the model without this repository
BartCopyConfig.register_for_auto_class()
BartCopyForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
