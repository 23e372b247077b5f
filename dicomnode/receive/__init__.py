"""Receiving: the Storage SCP, its guards and spool files, and ingest (a validated instance
into the files and the index before Success is answered). :class:`ingest.InstanceStore` is
also what other receivers (STOW-RS) call."""
