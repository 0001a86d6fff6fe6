"""UPS-RS: the reading worklist as DICOM workitems (PS3.18 chapter 11, the
Worklist Service) at ``/dicom-web/workitems``, over the same requests as the
REST API (``/api/worklist``), so a reporting tool that speaks UPS and a
browser see and change the same items under the same rules.

* ``GET /dicom-web/workitems?...`` -- Search (:mod:`worklist.upsrs.search`):
  ``application/dicom+json``, 204 when nothing matches.
* ``GET /dicom-web/workitems/{uid}`` -- Retrieve.
* ``POST /dicom-web/workitems[?workitem={uid}]`` -- Create from a UPS dataset
  (:mod:`worklist.upsrs.dataset` says which attribute holds which field);
  201 and ``Location``.
* ``POST /dicom-web/workitems/{uid}[?transaction={uid}]`` -- Update.
* ``PUT /dicom-web/workitems/{uid}/state`` -- Change State (IN PROGRESS with
  the client's own Transaction UID, COMPLETED, CANCELED).
* ``POST /dicom-web/workitems/{uid}/cancelrequest`` -- Request Cancellation.

Not offered: subscriptions and event reports (the Watch and Event SOP
classes); a reader learns of a cancellation request by retrieving the
workitem (its progress information) or from the REST API.
"""

from worklist.upsrs.http import add_routes

__all__ = ["add_routes"]
