"""What a loader holds for each stored tensor: its form and the bytes it keeps resident (imports no framework)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorForm:
    name: str
    form: str
    resident_bytes: int  # bytes the runtime holds for it
    dense_bytes: int  # bytes of the dense tensor


@dataclass
class FormReport:
    """One row per tensor; ``str`` gives the table and the loader's own summary line."""

    rows: list[TensorForm] = field(default_factory=list)

    def add(self, name: str, form: str, resident_bytes: int, dense_bytes: int) -> None:
        self.rows.append(TensorForm(name, form, resident_bytes, dense_bytes))

    def form_of(self, name: str) -> str:
        return next(row.form for row in self.rows if row.name == name)

    @property
    def resident_bytes(self) -> int:
        return sum(row.resident_bytes for row in self.rows)

    @property
    def dense_bytes(self) -> int:
        return sum(row.dense_bytes for row in self.rows)

    @property
    def ratio(self) -> float:
        return self.resident_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def summary(self) -> list[str]:
        """The lines under the table."""
        return []

    def forms_line(self) -> str:
        """One line in place of the table: how many tensors took each kind of form, and the bytes kept."""
        counts: dict[str, int] = {}
        for row in self.rows:
            kind = row.form.split(" (")[0]
            counts[kind] = counts.get(kind, 0) + 1
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (
            f"{len(self.rows)} tensors: {kinds}; {self.resident_bytes:,} bytes resident for "
            f"{self.dense_bytes:,} dense ({self.ratio:.3f}x)"
        )

    def __str__(self) -> str:
        width = max([len(row.name) for row in self.rows] + [6])
        lines = [f"{'tensor'.ljust(width)}  {'resident':>12}  {'dense':>12}  form"]
        for row in self.rows:
            lines.append(f"{row.name.ljust(width)}  {row.resident_bytes:>12,}  {row.dense_bytes:>12,}  {row.form}")
        return "\n".join(lines + self.summary())
