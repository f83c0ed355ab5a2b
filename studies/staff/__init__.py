"""The staff workspace (/staff/): search, sharing with live progress and the handout, the
shares and their actions, PACS nodes and the audit log. Thin views over the services of
accounts and studies; each module holds one part of the workspace and its URL patterns."""
