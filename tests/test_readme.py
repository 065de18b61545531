"""The README's set-up commands and CI stay in step, and its links and the docs pages' lead somewhere."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_commands() -> list[str]:
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    commands = []
    for line in lines[1:]:
        if line.startswith("    "):
            commands.append(line.strip())
        elif commands:
            break
    return commands


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    commands = setup_commands()
    assert len(commands) == 2
    assert "bench.demo" in commands[0] and "pytest" in commands[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert commands[1] in ci.splitlines()


# -- links between the README and the docs pages ----------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated one numbered."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in open(path, encoding="utf-8").read().splitlines():
        in_code ^= line.startswith("```")
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def pages() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, name) for name in ("README.md", "ARCHITECTURE.md")] + [
        os.path.join(docs, name) for name in sorted(os.listdir(docs)) if name.endswith(".md")
    ]


def test_every_link_of_the_readme_and_docs_leads_somewhere():
    """Sections moved between pages keep their links: each relative link names a file that exists and,
    for a markdown page, a heading it has."""
    broken = []
    for page in pages():
        for target in LINK.findall(open(page, encoding="utf-8").read()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(resolved) or (
                anchor and resolved.endswith(".md") and anchor not in anchors(resolved)
            ):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_lists_every_docs_page():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    documentation = readme.split("\n## Documentation\n", 1)[1]
    listed = set(re.findall(r"\(docs/([\w.-]+\.md)\)", documentation))
    assert listed == {name for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")}
