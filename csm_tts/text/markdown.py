"""Markdown to the words a reader would say, parsed by markdown-it-py (CommonMark plus tables and strikethrough).

What is said: the text of paragraphs, headings, list items, quotes and table cells, link text (not the target),
inline code as written. What is not: emphasis and heading markers, bullets, HTML, images, code blocks (a listing read
aloud is noise; `read_code_blocks=True` reads them). Ordered-list numbers are kept ("1, install it"): a line that
starts with "2024." is an ordered list to CommonMark, and its number is part of what was meant.

Each block ends as a sentence: a heading or a list item without closing punctuation gets a "." so the voice pauses
and the segmenter can cut there. markdown-it gives token contents, not offsets: each piece is found in the source by
a forward search from where the previous one ended (pieces come in source order), so every character keeps its
span. Escapes and entities (`\\*`, `&amp;`) arrive as their own tokens with the source spelling in `markup`.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.token import Token

from csm_tts.text.mapped import Builder, MappedText

# "text_join" would merge escapes and entities into the text around them, losing their source spelling.
_PARSER = MarkdownIt("commonmark").enable(["table", "strikethrough"]).disable("text_join")
# A block that ends otherwise gets a "." (a heading, a list item, "99.9%"). A clause end stays as it is: a streamed
# segment cut after "Hello there," must not be said as a finished sentence.
_NO_PERIOD_AFTER = ".!?:;…,—–-"
_BLOCK_CLOSERS = {"paragraph_close", "heading_close", "tr_close", "hr", "list_item_close", "blockquote_close"}
_CELL_OPENS = {"th_open", "td_open"}


class _Reader:
    """Walks the token stream, finding each piece's span in the source."""

    def __init__(self, source: MappedText, read_code_blocks: bool) -> None:
        self.source = source
        self.read_code_blocks = read_code_blocks
        self.cursor = 0
        self.out = Builder()
        self.block_start = 0
        # where each source line starts: a skipped block moves the cursor past its lines (token.map)
        self.line_starts = [0] + [i + 1 for i, char in enumerate(source.text) if char == "\n"]

    def locate(self, written: str) -> tuple[int, int] | None:
        """Where `written` appears next in the source (source indices), moving the cursor past it."""
        at = self.source.text.find(written, self.cursor)
        if at < 0:
            return None
        self.cursor = at + len(written)
        return at, self.cursor

    def skip(self, token: Token) -> None:
        """Move past a block that is not read (its content may not appear verbatim: indented code loses indents)."""
        if token.map:
            line = token.map[1]  # the first line after the block
            after = self.line_starts[line] if line < len(self.line_starts) else len(self.source.text)
            self.cursor = max(self.cursor, after)

    def emit(self, written: str, said: str | None = None) -> None:
        """Say `said` (default: `written` as it is) for the next occurrence of `written` in the source."""
        found = self.locate(written) if written else None
        if found is None:  # markdown-it rewrote it (link normalisation): keep it, mapped to where we are
            self.out.replace(said if said is not None else written, *self._here())
        elif said is None:
            self.out.copy(self.source, *found)
        else:
            self.out.replace(said, *self.source.source_span(*found))

    def _here(self) -> tuple[int, int]:
        at = self.source.position(self.cursor)
        return at, at

    def end_block(self) -> None:
        if len(self.out) == self.block_start:
            return
        if self.out.last_char not in _NO_PERIOD_AFTER:
            self.out.insert(".")
        self.out.insert("\n")
        self.block_start = len(self.out)

    def inline(self, children: list[Token]) -> None:
        for token in children:
            if token.type == "image":
                continue  # its children are alt text; an image is not read
            if token.type == "html_inline":
                self.locate(token.content)
                continue
            if token.type in ("text", "code_inline"):
                self.emit(token.content)
            elif token.type == "text_special":
                self.emit(token.markup, token.content)
            elif token.type in ("softbreak", "hardbreak"):
                self.emit("\n", " ")

    def read(self, tokens: list[Token]) -> MappedText:
        for token in tokens:
            if token.type == "inline":
                self.inline(token.children or [])
            elif token.type in ("fence", "code_block"):
                if self.read_code_blocks:
                    for line in token.content.splitlines():
                        self.emit(line)
                        self.end_block()
                else:
                    self.skip(token)
            elif token.type == "html_block":
                self.skip(token)
            elif token.type == "list_item_open" and token.info:
                self.emit(token.info + token.markup, token.info + ",")
                self.out.insert(" ")
            elif token.type in _CELL_OPENS and len(self.out) > self.block_start:
                self.out.insert(", ")
            if token.type in _BLOCK_CLOSERS:
                self.end_block()
        self.end_block()
        return self.out.build()


def markdown_to_speech(source: MappedText, *, read_code_blocks: bool = False) -> MappedText:
    """The speakable text of a markdown document; blocks end with sentence punctuation and a newline."""
    return _Reader(source, read_code_blocks).read(_PARSER.parse(source.text))
