"""Lessons: Markdown files with a small header, each a guided walk through prepared analyses.

A lesson file (any `*.md` in the lessons folder) looks like:

    ---
    title: What attention is
    summary: One head, one sentence.
    order: 1                    # position in the gallery (then by title)
    model: smollm2              # any model reference the app accepts
    text: The trophy didn't fit in the suitcase because it was too big.
    text_b: ...                 # optional second text (and/or model_b) for compare views
    ---
    Introduction, shown above the first step.

    ## A step's title
    view: explore?layer=14&head=mean     (a page and the settings of its link)
    The step's narrative, in Markdown.
    Look: what to look at.
    Question: a question for the class.
    Caveat: the caveat that applies.

A teacher can copy a view from the app: the part of a page's link after the host, minus `a=`
(the lesson's text and model define the analysis).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl, urlsplit

import yaml

from backend.analyses import AnalysisRequest
from backend.service import InputError
from pages import view_requests, view_state

# Pages a step may show (the names of their files and links).
VIEW_PAGES = ("explore", "head_grid", "head_importance", "rollout", "thought_anchors", "compare",
              "bertviz_views", "long_context_heads")
FIELDS = ("view", "look", "question", "caveat")
_FIELD = re.compile(rf"^({'|'.join(FIELDS)}):\s*(.*)$", re.IGNORECASE)
_HEADER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)


@dataclass(frozen=True)
class Step:
    """One screen of a lesson: a page with the settings of its link, and what to say."""

    title: str
    page: str
    params: dict[str, str]
    narrative: str
    look: str = ""
    question: str = ""
    caveat: str = ""


@dataclass(frozen=True)
class Lesson:
    """slug: the file's name without .md (what links carry)."""

    slug: str
    title: str
    summary: str
    model: str
    text: str
    intro: str
    steps: tuple[Step, ...]
    order: int = 100
    model_b: str | None = None
    text_b: str | None = None

    def requests(self, step: Step) -> tuple[AnalysisRequest, AnalysisRequest | None]:
        """The attention analyses a step shows: the lesson's text, and for a compare step the
        second side (text_b / model_b; the same analysis twice compares two of its heads)."""
        main = AnalysisRequest.make("attention", self.model, self.text)
        if step.page != "compare":
            return main, None
        return main, AnalysisRequest.make("attention", self.model_b or self.model,
                                          self.text_b or self.text)


@dataclass
class LessonSet:
    """Every lesson file of a folder; files that cannot be read are listed with the reason."""

    lessons: list[Lesson] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def get(self, slug: str) -> Lesson | None:
        return next((lesson for lesson in self.lessons if lesson.slug == slug), None)


def read_lessons(folder: Path) -> LessonSet:
    """All `*.md` lessons of `folder` (not its subfolders), in gallery order."""
    found = LessonSet()
    for path in sorted(Path(folder).glob("*.md")):
        if path.name.lower() == "readme.md":
            continue
        try:
            found.lessons.append(read_lesson(path))
        except InputError as e:
            found.errors[path.name] = str(e)
    found.lessons.sort(key=lambda lesson: (lesson.order, lesson.title))
    return found


def read_lesson(path: Path) -> Lesson:
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path.name}: not UTF-8 text.") from None
    match = _HEADER.match(source)
    if not match:
        raise InputError(f"{path.name}: no header: the file must start with a '---' block.")
    try:
        header = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path.name}: the header is not valid YAML: {e}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path.name}: the header must be 'name: value' lines.")
    missing = [k for k in ("title", "model", "text") if not header.get(k)]
    if missing:
        raise InputError(f"{path.name}: the header needs {', '.join(missing)}.")
    if not str(header.get("order", 100)).lstrip("-").isdecimal():
        raise InputError(f"{path.name}: 'order' must be a whole number.")
    intro, *sections = re.split(r"^## +", source[match.end():], flags=re.MULTILINE)
    steps = tuple(_step(path.name, section) for section in sections)
    if not steps:
        raise InputError(f"{path.name}: no steps: start each step with a '## ' heading.")
    return Lesson(slug=path.stem, title=str(header["title"]),
                  summary=str(header.get("summary", "")), model=str(header["model"]),
                  text=str(header["text"]).strip(), intro=intro.strip(), steps=steps,
                  order=int(header.get("order", 100)),
                  model_b=str(header["model_b"]) if header.get("model_b") else None,
                  text_b=str(header["text_b"]).strip() if header.get("text_b") else None)


def _step(file_name: str, section: str) -> Step:
    title, _, body = section.partition("\n")
    fields: dict[str, list[str]] = {}
    narrative: list[str] = []
    current = None  # look/question/caveat text runs on until a blank line
    for line in body.splitlines():
        match = _FIELD.match(line.strip())
        if match:
            name = match.group(1).lower()
            fields[name] = [match.group(2)]
            current = None if name == "view" else name  # a view is one line
        elif current and line.strip():
            fields[current].append(line.strip())
        else:
            current = None
            narrative.append(line)
    text = {name: " ".join(lines).strip() for name, lines in fields.items()}
    if not text.get("view"):
        raise InputError(f"{file_name}: step '{title.strip()}' has no 'view:' line.")
    page, params = parse_view(text["view"])
    if page not in VIEW_PAGES:
        raise InputError(f"{file_name}: step '{title.strip()}' shows '{page}'; a step can show "
                         f"{', '.join(VIEW_PAGES)}.")
    return Step(title=title.strip(), page=page, params=params,
                narrative="\n".join(narrative).strip(), look=text.get("look", ""),
                question=text.get("question", ""), caveat=text.get("caveat", ""))


def parse_view(view: str) -> tuple[str, dict[str, str]]:
    """"explore?layer=3&head=mean" (or a whole link) -> ("explore", {"layer": "3", ...}).
    Analysis ids in it are dropped: the lesson's own analyses take their place."""
    parts = urlsplit(view.strip())
    page = parts.path.strip("/").rsplit("/", 1)[-1]
    params = {k: v for k, v in parse_qsl(parts.query, keep_blank_values=False)
              if k not in ("a", "b")}
    return page, params


def step_requests(lesson: Lesson, step: Step, service) -> Iterator[AnalysisRequest]:
    """Every analysis the step's view shows, in order: the lesson's attention analyses, then
    what the view's own `requests` function (pages.view_requests, the one its page calls) asks
    for the step's settings. The caller computes each request it is given before asking for
    the next: later ones can depend on earlier results."""
    main, second = lesson.requests(step)
    ids = {}
    for name, request in (("a", main), ("b", second)):
        if request is not None:
            yield request
            ids[name] = service.cached(request)
    state = view_state.parse(step.page, {**step.params, **ids})
    if step.page == "thought_anchors":  # its source writes the trace with the lesson's model
        yield from view_requests.thought_anchors(state, service, model=main.model)
    else:
        yield from view_requests.REQUESTS[step.page](state, service)
