"""Refuses writes on an ltxfs replica before SQLite sees them.

ltxfs serves ``.primary`` in the mount's root on a replica: the primary's
hostname and a newline. It does not exist on the primary. Before every statement
that writes (and every ``BEGIN IMMEDIATE``, which Django issues for atomic blocks
with ``transaction_mode = IMMEDIATE``), the guard reads it; when it exists, the
statement is refused with :class:`ReplicaWriteError` naming the primary, instead
of SQLite's "attempt to write a readonly database".
"""

from pathlib import Path

# Statements that write or take the write lock.
WRITE_PREFIXES = (
    "INSERT",
    "UPDATE",
    "DELETE",
    "REPLACE",
    "CREATE",
    "DROP",
    "ALTER",
    "BEGIN IMMEDIATE",
    "BEGIN EXCLUSIVE",
)


class ReplicaWriteError(Exception):
    """A write reached a read replica; it must go to the primary."""

    def __init__(self, primary):
        self.primary = primary
        super().__init__(
            f"this node is a read replica of {primary}: writes must go to the primary"
        )


def primary_of(database_path):
    """The primary's hostname when ``database_path`` is on an ltxfs replica."""
    try:
        return (Path(database_path).parent / ".primary").read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_guard(execute, sql, params, many, context):
    if sql.lstrip().upper().startswith(WRITE_PREFIXES):
        primary = primary_of(context["connection"].settings_dict["NAME"])
        if primary is not None:
            raise ReplicaWriteError(primary)
    return execute(sql, params, many, context)


def install_write_guard(sender, connection, **kwargs):
    """Adds the guard to every new SQLite connection (``connection_created``)."""
    if connection.vendor == "sqlite" and write_guard not in connection.execute_wrappers:
        connection.execute_wrappers.append(write_guard)
