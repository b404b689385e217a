"""Modules: attention layers, an attention decoder step, and torch.nn drop-in RNNs."""

from fastattn.nn.attention import Attention, AttentionCache
from fastattn.nn.decoder import AttentionDecoderCell
from fastattn.nn.recurrent import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["Attention", "AttentionCache", "AttentionDecoderCell", "LSTMCell", "GRUCell", "LSTM", "GRU"]
