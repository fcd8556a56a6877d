"""The one redactor for anything a person or a file can see: log lines (Scrapy's
own included: fetcher/logs.py makes every log record pass here), records, the manifest, the summary,
failed.txt's comments, error messages, command output.

Secrets, each shown as ``***``:

- a URL's userinfo: everything between ``scheme://`` and the last ``@`` of
  the URL (``http://alice:s3cret@host/x`` -> ``http://***@host/x``), also
  when the password holds an unencoded ``/``, ``?``, ``#`` or a space, or the
  host is a broken IPv6 literal. When it is unclear whether an ``@`` ends a
  userinfo, more is hidden, never less: an ``@`` later in a URL whose
  authority is a plain ``host`` or ``[v6]`` (no ``:``) is a path's or a
  query's (``http://host/a@b`` is kept), but behind ``host:81`` it may as
  well end a password ``81/a``, so ``http://host:81/a@b`` gives
  ``http://***@b``;
- the value of a secret header, to the end of its line: ``Authorization``,
  ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie`` (any name ending in
  authorization, cookie, token, secret, password, passwd, passphrase,
  credentials, ``-key`` or ``_key``: ``X-Api-Key``, ``Telnet Password``) in
  the ``Name: value`` form, so also in ``header=Name: value`` list options;
- in a dict or JSON repr, the string values (or lists of strings) of keys
  whose name holds SECRET, PASSWORD, PASS, TOKEN, KEY, CREDENTIAL,
  AUTHORIZATION or COOKIE, any case (``'AWS_SECRET_ACCESS_KEY': '***'``,
  ``{b'Cookie': [b'***']}``), the same in ``('Authorization', '***')`` pairs,
  and ``NAME=value`` words with such names (``-s AWS_SESSION_TOKEN=***``;
  not ``?access_token=`` in a URL's query, which is no word of its own).

Text without secrets comes back unchanged, and redacting twice is redacting
once. Every function takes time linear in its input: no pattern here can
backtrack over what it already matched (possessive quantifiers, names
found by their literal words, URLs consumed word by word in one pass).

Only failed.txt's entries keep URLs and headers as given, so that a rerun of
it still works. No Scrapy here: the CLI and the queue tools use it too.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["HIDDEN", "host_of", "redact", "safe_line", "safe_text", "safe_url"]

HIDDEN = "***"

# --- secret values named by a key or a header -------------------------------------------
#
# Found in a lowercased copy of the text (bytes, one per character, so that
# positions match), by patterns that each start with a literal word: the
# regex engine then skips to the word's occurrences instead of trying every
# position, and no pattern can go back over what it matched (possessive
# quantifiers, bounded name suffixes).

_STR = rb"""b?(?:'(?:[^'\\\n]++|\\.)*+'|"(?:[^"\\\n]++|\\.)*+")"""
_STRS = rb"(?:" + _STR + rb"|[\[(]\s*+" + _STR + rb"(?:\s*+,?\s*+" + _STR + rb")*+\s*+,?\s*+[\])])"
_ONE_STR = re.compile(rb"""'((?:[^'\\\n]++|\\.)*+)'|"((?:[^"\\\n]++|\\.)*+)\"""")

# word: (what completes a secret header name that ends in it, what else a secret key name needs)
_WORDS = {
    b"authorization": (rb"", rb""),
    b"cookie": (rb"2?", rb""),
    b"token": (rb"", rb""),
    b"secret": (rb"", rb""),
    b"credential": (rb"s?", rb""),
    b"pass": (rb"(?:wd|word|phrase)", rb"(?:w|phrase|(?<![a-z]pass)(?![a-z]))"),  # not FTP_PASSIVE_MODE
    b"key": (rb"(?:(?<=[-_]key)|(?<=apikey))", rb""),  # X-Api-Key:, secret_key: (not any "key:")
}
_NAMED = [
    (word, re.compile(
        word + rb"(?:" + header + rb"[ \t]*+:[ \t]*+(?!//)(?P<h>[^\r\n]++)"  # Name: value, to the line's end
        + rb"|" + key + rb"[\w.-]{0,24}+['\"]\s*+:\s*+(?P<v>" + _STRS + rb"))"),  # 'NAME': 'value'
     # NAME=value, taken when NAME stands alone. (A pattern of its own, that stops at a space:
     # a NAME= not taken must not keep the patterns from seeing what follows it.)
     re.compile(word + key + rb"[\w.-]{0,24}+=(?=\S)"))
    for word, (header, key) in _WORDS.items()
]
_ANY_WORD = rb"(?:" + rb"|".join(word + key for word, (_, key) in _WORDS.items()) + rb")"
# ('Authorization', 'value'), as in a tuple of header pairs.
_PAIR = re.compile(rb"\(\s*+b?(['\"])(?=[\w.-]*?" + _ANY_WORD + rb")[\w.-]++\1\s*+,\s*+(" + _STR + rb")")
_NAME_BACKWARDS = re.compile(rb"[\w.-]*+")
_SPACE = re.compile(rb"\s")
_ASSIGNED = re.compile(rb"""(?:'[^'\n]*+'|"[^"\n]*+"|[^\s'"]++|['"])++""")  # to a space, 'quoted ones' too
_NAME_MAX = 64  # a longer NAME= is taken as a word of its own without looking further back
_SPACES = frozenset(b" \t\n\r\f\v")
_ROUNDS = 4


def _string_spans(low: bytes, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    """The contents of the (non-empty) string literals in low[start:end]."""
    if low[end - 1] in b"'\"" and low[start] not in b"[(":  # one literal, b'...' or '...'
        start += 2 if low[start] == 98 else 1
        if end - 1 > start:
            spans.append((start, end - 1))
        return
    for s in _ONE_STR.finditer(low, start, end):
        group = 1 if s.start(1) >= 0 else 2
        if s.end(group) > s.start(group):
            spans.append(s.span(group))


def _stands_alone(low: bytes, start: int) -> bool:
    """The name that ends at *start* begins *low* or follows whitespace (NAME=, not ?x_token=)."""
    if start == 0 or low[start - 1] in _SPACES:
        return True
    window = low[max(0, start - _NAME_MAX):start][::-1]
    run = _NAME_BACKWARDS.match(window).end()
    return run == len(window) or window[run] in _SPACES


def _named_spans(text: str) -> list[tuple[int, int]]:
    """Where the values of secret headers, keys and NAME= words are in *text*."""
    low = text.encode("latin-1", "replace").lower()
    spans: list[tuple[int, int]] = []
    found = False
    for word, named, assigned in _NAMED:
        if word not in low:
            continue
        found = True
        for m in named.finditer(low):
            kind = m.lastgroup
            if kind == "h":
                spans.append(m.span(kind))
            else:
                _string_spans(low, m.start(kind), m.end(kind), spans)
        if b"=" in low:
            _assigned_spans(low, assigned, spans)
    if found and b"(" in low:
        for m in _PAIR.finditer(low):
            _string_spans(low, m.start(2), m.end(2), spans)
    return spans


def _assigned_spans(low: bytes, assigned: re.Pattern[bytes], spans: list[tuple[int, int]]) -> None:
    """The values of ``NAME=value`` words with a secret NAME (one pass over *low*)."""
    at = 0
    while m := assigned.search(low, at):
        if _stands_alone(low, m.start()):
            value = _ASSIGNED.match(low, m.end())
            if value.group() not in (b"''", b'""'):
                spans.append(value.span())
            at = value.end()
        else:  # nor does any NAME= further in this word
            space = _SPACE.search(low, m.end())
            at = space.start() if space else len(low)


def _hide_spans(text: str, spans: list[tuple[int, int]]) -> tuple[str, bool]:
    """*text* with *spans* (in any order) shown as ``***``, and whether one
    reached out of another. Of overlapping spans the one that starts first
    (the longer, of two that start together) is hidden; the others were
    found inside it (a ``Cookie:`` in a quoted value) and mostly went with it."""
    if not spans:
        return text, False
    spans.sort(key=lambda span: (span[0], -span[1]))
    parts = []
    done = 0
    overlapped = False
    for start, end in spans:
        if start > done or not parts:  # (spans that touch would merge, and change the text around)
            parts += (text[done:start], HIDDEN)
            done = end
        elif end > done:
            overlapped = True
    parts.append(text[done:])
    return "".join(parts), overlapped


def _hide_named(text: str) -> str:
    """*text* with the values of secret headers, keys and NAME= words hidden.

    A value hidden with another one that held its name may have kept the
    patterns from seeing a value after it: then the text is looked at again
    (a few times at most; values already hidden are found again as ``***``)."""
    for _ in range(_ROUNDS):
        text, overlapped = _hide_spans(text, _named_spans(text))
        if not overlapped:
            break
    return text


# --- URL userinfo ------------------------------------------------------------------------
#
# One pattern, anchored nowhere but matching in one go everything up to the
# next userinfo: plain URLs (``http://host/...``), text without "://", and
# URLs with a port but no "@" after it in their word are consumed as they
# come, so no character is scanned twice. A URL's authority runs to the
# first "/", "?", "#" or whitespace.

_PLAIN = r"(?:\[[^\]/?#\s@]*+\]|[^\[\]:/?#\s@]*+)"  # a host name or a [v6] literal: no ":", no "@"
_AUTH_END = r"(?=[/?#\s]|\Z)"


def _url_pattern(whole: bool) -> re.Pattern[str]:
    """Matches ``(?P<pre>text without userinfo)`` then maybe a "://" and
    ``(?P<u>its userinfo, up to and with the "@" that ends it)``: the last
    "@" of the URL's word; and when what follows that "@" (or the "://" when
    the word has none) is surely no host:port (``kim:pa ss@host``), the last
    "@" of the next word on the line that has one, and so on.

    *whole*: the text is one URL, spaces included (no words, no lines)."""
    ws = "" if whole else r"\s"
    plain = _PLAIN + _AUTH_END
    host_port = _PLAIN + r"(?::(?!//)[0-9]*+)?" + _AUTH_END
    ordinary = rf"[^{ws}:]++|:(?!//)"
    # a URL with a port and no "@" after it in its word (nor a URL of another kind)
    quiet_port = (rf"://(?={host_port})(?:[^{ws}:@]++|:(?!//)|://(?={host_port}))*+"
                  + (r"\Z" if whole else r"(?=\s|\Z)"))
    in_word = rf"(?:[^{ws}@]*+@)++"
    if whole:
        return re.compile(rf"(?P<pre>(?:{ordinary}|://(?={plain})|{quiet_port})*+)(?:://(?P<u>{in_word}))?")
    to_at = r"[^\s@]*+(?:[^\S\n]++[^\s@]*+)*+"  # up to the first "@" on the line
    quiet_other = rf"://{to_at}(?=\n|\Z)"  # a URL without a "@" after it on its line
    to_word = rf"{to_at}(?:@[^\s@]*+(?=@))*+@"  # to the last "@" of the next word that has one
    # the rest of a word, after its last "@": a host[:port] and nothing that could take more
    quiet_rest = rf"{host_port}(?:[^\s:@]++|:(?!//)|://(?={host_port}))*+(?=\s|\Z)"
    # Reaching a "://" that pre did not take, a "@" follows on its line: the
    # userinfo ends at the last "@" of the URL's word, else of that next word,
    # and of the next ones as long as what follows is not a quiet rest.
    return re.compile(rf"(?P<pre>(?:{ordinary}|://(?={plain})|{quiet_port}|\s++|{quiet_other})*+)"
                      rf"(?:://(?P<u>(?:{in_word}|{to_word})(?:(?!{quiet_rest}){to_word})*+))?")


_URL_IN_TEXT = _url_pattern(False)
_URL_ALONE = _url_pattern(True)


_UNSETTLING = re.compile(r"""['"\n]""")  # hidden with a userinfo, they may change what _hide_named sees


def _hide_userinfo(match: re.Match[str], unsettled: list[bool]) -> str:
    pre, userinfo = match.group("pre", "u")
    if userinfo is None:
        return pre
    if userinfo == "@":
        return pre + "://@"
    if not unsettled and _UNSETTLING.search(userinfo):
        unsettled.append(True)
    return pre + "://***@"


def _redact(text: str, whole: bool) -> str:
    if whole and text.startswith("//"):  # a network-path reference: the authority comes first
        return _redact(":" + text, whole)[1:]
    urls = _URL_ALONE if whole else _URL_IN_TEXT
    for _ in range(_ROUNDS):
        text = _hide_named(text)
        if "@" not in text or "://" not in text:
            break
        unsettled = []
        text = urls.sub(lambda m: _hide_userinfo(m, unsettled), text)
        if not unsettled:
            break
    return text


# --- the public functions ----------------------------------------------------------------


def redact(text: str) -> str:
    """*text* (a log message, an error, a list line; any number of lines) with
    every URL userinfo and every secret header or setting value shown as ``***``."""
    return _redact(text, False)


def safe_url(url: str) -> str:
    """*url* with any user:password replaced by ``***`` (and any other secret
    :func:`redact` knows, when *url* is a whole list line). *url* is one URL,
    spaces included."""
    return _redact(url, True)


def host_of(url: str) -> str:
    """``host[:port]`` of *url*, lowercased, never with the credentials a URL may carry:
    the host the URL's request goes to, as urlsplit (and so Scrapy) reads it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(no host)"
    return (parts.hostname or "(no host)") + (f":{port}" if port else "")


def safe_text(text: str, *urls: str) -> str:
    """*text* (an error message, a log line) redacted, and the credentials of
    *urls* hidden also where they appear without their URL (``alice:s3cret@host``)."""
    for url in urls:
        if url and url in text:
            text = text.replace(url, safe_url(url))
        if url.startswith("//"):
            url = ":" + url
        for m in _URL_ALONE.finditer(url):
            userinfo = m.group("u")
            if userinfo and userinfo != "@":
                text = text.replace(userinfo, HIDDEN + "@")
    return redact(text)


def safe_line(text: str) -> str:
    """A list line for messages (a bad line's report): URL credentials and the
    values of ``header=Authorization:``-like options hidden."""
    return redact(text)
