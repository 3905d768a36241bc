"""Triton Python model: chat messages (or prompt text) -> token ids for the TensorRT-LLM step.

Uses the model's own Hugging Face tokenizer (``tokenizer_dir``). ``MESSAGES`` (a JSON list
of ``{"role", "content"}``) is rendered with the tokenizer's chat template -- DeepSeek's role
markers come from there, never from the caller -- after every special-token string inside a
message is broken with a word joiner, so text in a document cannot become a control token.
A tokenizer without a chat template (a base model) gets plain ``Role: content`` lines.
``QUERY`` is raw prompt text, tokenised as is. A prompt longer than ``max_input_len`` is
refused with an error naming both numbers (the engine would reject it later and less
clearly); the requested output length is capped at ``max_output_len``. Stop words become
TensorRT-LLM's ``[2, n]`` layout: the concatenated ids, then the end offset of each word
(padded with -1).
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

WORD_JOINER = "\u2060"
ROLES = ("system", "user", "assistant")


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _optional_text(request: object, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else _text(tensor.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"])
        self.max_input_len = int(params["max_input_len"])
        self.max_output_len = int(params["max_output_len"])
        end = self.tokenizer.eos_token_id
        if end is None:
            end = self.tokenizer.sep_token_id
        self.end_id = int(end if end is not None else 0)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.end_id)
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        specials = set(self.tokenizer.all_special_tokens) | {t.content for t in added.values()}
        self.specials = sorted((t for t in specials if len(t) > 1 and not t.isspace()), key=len, reverse=True)

    def _neutralise(self, text: str) -> str:
        for token in self.specials:
            if token in text:
                text = text.replace(token, token[0] + WORD_JOINER + token[1:])
        return text

    def _messages(self, raw: str) -> list[int]:
        """Token ids of a conversation, through the model's chat template."""
        try:
            messages = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"messages is not JSON: {exc}") from None
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty JSON list")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': text}}")
            content = m["content"]
            if m["role"] == "assistant":  # an earlier answer: its reasoning is not fed back
                content = content.rsplit("</think>", 1)[-1].lstrip()
            clean.append({"role": m["role"], "content": self._neutralise(content)})
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # the template refuses this conversation
                raise ValueError(f"the chat template failed: {exc}") from None
            return self.tokenizer.encode(text, add_special_tokens=False)  # the template wrote BOS
        plain = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in clean) + "Assistant:"
        return self.tokenizer.encode(plain)

    def _stop_words(self, words: list[str]) -> np.ndarray:
        ids: list[int] = []
        offsets: list[int] = []
        for word in words:
            ids += self.tokenizer.encode(word, add_special_tokens=False)
            offsets.append(len(ids))
        if not ids:
            return np.array([[[0], [-1]]], dtype=np.int32)
        offsets += [-1] * (len(ids) - len(offsets))
        return np.array([[ids, offsets]], dtype=np.int32)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            query = _optional_text(request, "QUERY")
            messages = _optional_text(request, "MESSAGES")
            try:
                if (query is None) == (messages is None):
                    raise ValueError("send exactly one of text_input and messages")
                ids = self._messages(messages) if messages is not None else self.tokenizer.encode(query)
                empty = not ids or (query is not None and not query.strip())
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            wanted = int(
                pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy().reshape(-1)[0]
            )
            stop_tensor = pb_utils.get_input_tensor_by_name(request, "STOP_WORDS_DICT")
            stop = [_text(w) for w in stop_tensor.as_numpy().reshape(-1)] if stop_tensor is not None else []
            if empty:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError("the prompt is empty"))
                )
                continue
            if len(ids) > self.max_input_len:
                message = f"the prompt has {len(ids)} tokens; this model accepts at most {self.max_input_len}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            if wanted < 1:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError("max_tokens must be >= 1"))
                )
                continue
            outputs = [
                pb_utils.Tensor("INPUT_ID", np.array([ids], dtype=np.int32)),
                pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(ids)]], dtype=np.int32)),
                pb_utils.Tensor(
                    "OUT_REQUEST_OUTPUT_LEN", np.array([[min(wanted, self.max_output_len)]], dtype=np.int32)
                ),
                pb_utils.Tensor("STOP_WORDS_IDS", self._stop_words(stop)),
                pb_utils.Tensor("OUT_END_ID", np.array([[self.end_id]], dtype=np.int32)),
                pb_utils.Tensor("OUT_PAD_ID", np.array([[self.pad_id]], dtype=np.int32)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
