"""The plugins that ship with foxnode. ``time`` loads always
(pluginhost.DEFAULTS; setup.cfg names it as an entry point of the group
``foxnode.plugins`` too); the others load when asked for by name:
``--plugin chain`` is foxchain (``chain/``), a proof-of-work ledger."""
