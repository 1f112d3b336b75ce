"""The few Label Studio calls the bridge makes, through the official SDK (``label-studio-sdk``).

Errors are sorted into :class:`Unavailable` (the server is down, restarting, overloaded, or answered
5xx: wait and retry) and :class:`LabelStudioError` (the request itself is wrong: log it; an auth error
at start-up stops the bridge).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from . import template

log = logging.getLogger("armd_labelstudio")


class LabelStudioError(Exception):
    def __init__(self, msg: str, status: Optional[int] = None):
        super().__init__(msg)
        self.status = status


class Unavailable(LabelStudioError):
    """Label Studio cannot be reached or failed on its side: retry later."""


class AuthError(LabelStudioError):
    """The API key is not accepted (401/403)."""


class NotFound(LabelStudioError):
    pass


def _translate(e: Exception, what: str) -> LabelStudioError:
    if isinstance(e, ApiError):
        status = e.status_code or 0
        body = e.body if isinstance(e.body, (str, bytes)) else json.dumps(e.body, default=str)
        body = (body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body))[:300]
        msg = f"{what}: HTTP {status}: {body}"
        if status in (401, 403):
            return AuthError(msg, status)
        if status == 404:
            return NotFound(msg, status)
        if status == 429 or status >= 500 or status == 0:
            return Unavailable(msg, status)
        return LabelStudioError(msg, status)
    if isinstance(e, (httpx.TransportError, httpx.TimeoutException, ConnectionError, OSError)):
        return Unavailable(f"{what}: {type(e).__name__}: {e}")
    return LabelStudioError(f"{what}: {type(e).__name__}: {e}")


def _as_dict(obj: Any) -> Dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    return dict(obj)


class LabelStudioAPI:
    def __init__(self, url: str, api_key: str, timeout: float = 20.0):
        self.url = url.rstrip("/")
        try:
            # max_retries=0: the bridge's own loop retries with backoff and reports the outage.
            self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout, max_retries=0)
        except ApiError as e:  # an expired personal access token is detected here
            raise _translate(e, "API key") from None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LabelStudioError:
            raise
        except Exception as e:  # noqa: BLE001 - sorted into the bridge's error kinds
            raise _translate(e, what) from None

    # ----------------------------------------------------------------------------------- users
    def whoami(self) -> Dict[str, Any]:
        return _as_dict(self._call("whoami", self.client.users.whoami))

    def user_email(self, user_id: int) -> Optional[str]:
        user = _as_dict(self._call(f"get user {user_id}", self.client.users.get, id=user_id))
        return user.get("email") or None

    # -------------------------------------------------------------------------------- projects
    def project(self, project_id: int) -> Dict[str, Any]:
        return _as_dict(self._call(f"get project {project_id}", self.client.projects.get, id=project_id))

    def find_project(self, title: str) -> Optional[int]:
        pager = self._call("list projects", self.client.projects.list, title=title, page_size=100)
        ids = sorted(p.id for p in self._call("list projects", list, pager) if p.title == title)
        return ids[0] if ids else None

    def create_project(self, title: str, maximum_annotations: int) -> int:
        p = self._call(
            "create project", self.client.projects.create,
            title=title,
            description=template.DESCRIPTION,
            label_config=template.LABEL_CONFIG,
            expert_instruction=template.INSTRUCTIONS,
            show_instruction=True,
            show_skip_button=True,
            enable_empty_annotation=False,
            maximum_annotations=maximum_annotations,
            sampling="Sequential sampling",
            show_collab_predictions=False,
        )
        return p.id

    def set_maximum_annotations(self, project_id: int, n: int) -> None:
        self._call("update project", self.client.projects.update, id=project_id, maximum_annotations=n)

    # ----------------------------------------------------------------------------------- tasks
    def tasks_for_request(self, project_id: int, request_id: str) -> List[int]:
        """Ids of the project's tasks created for this armd request (normally zero or one)."""
        query = {"filters": {"conjunction": "and", "items": [{
            "filter": "filter:tasks:data.armd_request_id", "operator": "equal", "type": "String",
            "value": request_id}]}}
        pager = self._call("find task", self.client.tasks.list, project=project_id,
                           query=json.dumps(query), fields="task_only", page_size=100)
        tasks = self._call("find task", list, pager)
        return sorted(t.id for t in tasks if (t.data or {}).get("armd_request_id") == request_id)

    def create_task(self, project_id: int, data: Dict[str, Any], overlap: int) -> int:
        t = self._call("create task", self.client.tasks.create, project=project_id, data=data,
                       overlap=overlap)
        return t.id

    def set_overlap(self, task_id: int, overlap: int) -> None:
        self._call("update task", self.client.tasks.update, id=str(task_id), overlap=overlap)

    def delete_task(self, task_id: int) -> bool:
        """Deletes a task; False when it was already gone."""
        try:
            self._call(f"delete task {task_id}", self.client.tasks.delete, id=str(task_id))
            return True
        except NotFound:
            return False

    def annotated_tasks(self, project_id: int, first_id: int, last_id: int
                        ) -> Iterator[Tuple[int, List[Dict[str, Any]]]]:
        """(task id, annotations) of the tasks with ids in [first_id, last_id] that have at least one
        submitted annotation (skipped ones are not counted by Label Studio's ``total_annotations``)."""
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number",
             "value": 0},
            {"filter": "filter:tasks:id", "operator": "in", "type": "Number",
             "value": {"min": first_id, "max": last_id}},
        ]}}
        pager = self._call("list annotated tasks", self.client.tasks.list, project=project_id,
                           query=json.dumps(query), fields="all", page_size=100)
        for task in self._call("list annotated tasks", list, pager):
            anns = [_as_dict(a) for a in (task.annotations or [])]
            yield task.id, anns
