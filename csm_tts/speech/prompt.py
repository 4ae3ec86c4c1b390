"""Building a request's prompt before its prefill, and the frame limits that follow from it.

`PromptBuilder` is part of `CsmEngine` (a base class): it reads the engine's processor, model, limits and context
size, and touches no slot, so the scheduler runs it on its own thread beside the running streams.
"""

from __future__ import annotations

import torch

from csm_tts import FRAME_MS, SAMPLES_PER_FRAME
from csm_tts.speech.length_rule import default_audio_length_ms
from csm_tts.speech.request import ContextTooLong, GenerationRequest, Limits, validate_request
from csm_tts.speech.stream import Prompt


class PromptBuilder:
    processor: object
    model: object
    device: torch.device
    limits: Limits
    max_positions: int
    codebook_size: int

    def validate(self, request: GenerationRequest) -> None:
        validate_request(request, self.limits, self.codebook_size)

    # -- limits -------------------------------------------------------------------------------------------------
    def min_prompt_positions(self, request: GenerationRequest) -> int:
        """A lower bound of the prompt's positions, cheap: the texts' tokens plus one position per 80 ms frame of
        context audio (Mimi's frame rate). The chat template's markers only add to it. No Mimi, no chat template."""
        tokenizer = self.processor.tokenizer
        texts = [request.text, *(s.text for s in request.context)]
        tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        return tokens + sum(-(-s.audio.size // SAMPLES_PER_FRAME) for s in request.context)

    def max_frames(self, request: GenerationRequest, prompt_length: int, estimated: bool = False) -> int:
        """Frames this request may generate. An explicit max_audio_length_ms must fit the context with the prompt;
        without one the limit follows the text (length_rule.py) and shrinks to what the context has left."""
        room = self.max_positions - prompt_length
        takes = f"takes {'at least ' if estimated else ''}{prompt_length} positions"
        if request.max_audio_length_ms is not None:
            frames = request.max_audio_length_ms // FRAME_MS
            if frames > room:
                raise ContextTooLong(
                    f"the prompt {takes} (text and context) and max_audio_length_ms "
                    f"{request.max_audio_length_ms} needs {frames} more; the model's context holds "
                    f"{self.max_positions}: shorten the text or context, or lower max_audio_length_ms"
                )
            return frames
        if room < 1:
            raise ContextTooLong(
                f"the prompt {takes} (text and context); the model's context holds "
                f"{self.max_positions}, leaving no room for audio: shorten the text or context"
            )
        return min(default_audio_length_ms(request.text, self.limits.max_audio_length_ms) // FRAME_MS, room)

    # -- prompt -------------------------------------------------------------------------------------------------
    def prompt_embeds(self, request: GenerationRequest) -> torch.Tensor:
        conversation = [
            {"role": str(s.speaker), "content": [{"type": "text", "text": s.text}, {"type": "audio", "audio": s.audio}]}
            for s in request.context
        ]
        conversation.append({"role": str(request.speaker_id), "content": [{"type": "text", "text": request.text}]})
        inputs = self.processor.apply_chat_template(conversation, tokenize=True, return_dict=True).to(self.device)
        if "input_values" in inputs:
            inputs["input_values"] = inputs["input_values"].to(self.model.dtype)
        # transformers' own merge of text embeddings with Mimi-encoded context audio, as `generate` uses it.
        merged = self.model._merge_input_ids_with_input_values(
            input_ids=inputs["input_ids"],
            input_values=inputs.get("input_values"),
            input_values_cutoffs=inputs.get("input_values_cutoffs"),
        )
        return merged["inputs_embeds"]

    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> Prompt:
        """Validate and build the prompt, cheap checks first: the prompt's positions are bounded from below before
        any context audio is Mimi-encoded, so a request that cannot fit costs a tokenizer call, not seconds of
        encoding. Raises InvalidRequest. Needs no stream state: the scheduler runs it off its stepping thread."""
        self.validate(request)
        self.max_frames(request, self.min_prompt_positions(request), estimated=True)  # raises early when it cannot fit
        embeds = self.prompt_embeds(request)
        return Prompt(request, embeds, self.max_frames(request, embeds.shape[1]))
