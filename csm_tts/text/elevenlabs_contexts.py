"""The rules of ElevenLabs' input streaming that need memory of the connection: which contexts are open (at most
five, as ElevenLabs allows), whether a context's text was flushed before it is closed, and that stream-input takes
no text after its end. Plain state, no I/O; the endpoint asks `admit` about every parsed message.

Closing a context means two things to pipecat (docs/elevenlabs.md): after a flush at the end of a turn, "speak what
was flushed, then isFinal"; with text after the last flush, an interruption. `admit` tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from csm_tts.text.elevenlabs import (
    MAX_CONTEXTS,
    CloseContext,
    EndOfInput,
    Flush,
    Message,
    ProtocolError,
    Text,
)


@dataclass
class Contexts:
    multi: bool
    # open context -> whether text arrived after its last flush (None is the default context of stream-input)
    unflushed: dict[str | None, bool] = field(default_factory=dict)
    ended: bool = False

    def admit(self, message: Message) -> Message | None:
        """The message to act on, or None when there is nothing to do (a flush or close of a context that is not
        open); raises ProtocolError when it breaks the connection's rules."""
        if isinstance(message, Text):
            return self._text(message)
        if isinstance(message, Flush):
            if message.context_id not in self.unflushed:
                return None
            self.unflushed[message.context_id] = False
        elif isinstance(message, CloseContext):
            if message.context_id not in self.unflushed:
                return None
            return replace(message, interrupt=self.unflushed.pop(message.context_id))
        elif isinstance(message, EndOfInput):
            self.ended = True
        return message

    def _text(self, message: Text) -> Text:
        if self.ended:
            raise ProtocolError('the input has ended ({"text": ""} was sent); open a new connection for more text')
        context = message.context_id
        if context not in self.unflushed and len(self.unflushed) >= MAX_CONTEXTS:
            raise ProtocolError(
                f"Maximum simultaneous contexts per WebSocket connection exceeded ({MAX_CONTEXTS}). "
                "Please close an existing context before opening a new one.",
                code="max_active_conversations",
            )
        self.unflushed[context] = not message.flush and (
            self.unflushed.get(context, False) or bool(message.text.strip())
        )
        return message
