"""Errors of the compiled-artifact store.

Each one means "this build will not be used"; the message names the file or the key field
at fault and says what to do (usually: recompile, or delete the build directory). They all
derive from `CompiledServeError`, so a caller that serves requests can catch the family.
"""

from __future__ import annotations

from compiled_serve.errors import CompiledServeError


class ArtifactStoreError(CompiledServeError):
    """Base class for every refusal of the artifact store."""


class InvalidBuildKeyError(ArtifactStoreError, ValueError):
    """A `BuildKey` field cannot be canonicalized (wrong type, empty, duplicate bucket...)."""


class InvalidArtifactNameError(ArtifactStoreError, ValueError):
    """An artifact name could escape the build directory or is not in the safe charset."""


class ArtifactMismatchError(ArtifactStoreError):
    """The stored build was made from different inputs than the ones asked for.

    `fields` lists the `BuildKey` fields that differ, e.g. ``["dtype"]``.
    """

    def __init__(self, fields: list[str], details: list[str], where: str = ""):
        self.fields = list(fields)
        self.details = list(details)
        loc = f" at {where}" if where else ""
        prefix = f"mismatched build{loc} (stored vs requested): "
        super().__init__(prefix + "; ".join(details) + ". Recompile for these inputs.")


class ArtifactTamperedError(ArtifactStoreError):
    """A file's bytes, size or the manifest do not match what the manifest recorded.

    Nothing from the build is returned: a tampered build is never partly used.
    """

    def __init__(self, problems: list[str], where: str = ""):
        self.problems = list(problems)
        loc = f" in {where}" if where else ""
        super().__init__(
            f"build refused{loc}: " + "; ".join(problems) + ". Delete the build directory and recompile."
        )


class ArtifactIncompleteError(ArtifactStoreError):
    """A file the manifest lists is missing (or the manifest itself is)."""

    def __init__(self, problems: list[str], where: str = ""):
        self.problems = list(problems)
        loc = f" in {where}" if where else ""
        super().__init__(
            f"incomplete build{loc}: " + "; ".join(problems) + ". Delete the build directory and recompile."
        )


class InductorArtifactError(ArtifactStoreError):
    """torch could not serialize or hot-load its compile-cache artifacts."""
