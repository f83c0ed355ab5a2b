"""The DICOM network stack (PS3.7, PS3.8): the wire format, the C-MOVE client, the storage SCP
and the PACS client built on pynetdicom (C-ECHO, C-FIND, C-GET, and C-MOVE through move_scu)."""
