"""What a call really is, before any backend runs it: a call *form*. See ``structure`` (dense masks that say
more than they need) and ``autosdpa.masks`` (mask objects that carry their structure)."""
