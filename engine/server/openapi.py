"""The OpenAPI 3.0 document of the HTTP routes in ``engine/server/http.py``.

It follows Beam's documented routes and schemas (Task, TaskSubmitResponse,
bearerAuth) and also lists every status code that the routes return, plus
the health, OpenAPI and output download routes that only this engine serves.
"""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": ERROR}},
    }


UNAUTHORIZED = _error("Unauthorized - missing or invalid Bearer token.")
NOT_FOUND = _error("Not found, or owned by another workspace.")
BAD_JSON = _error("The body is not valid JSON.")
NOT_OBJECT = _error("The body is JSON but not an object.")
TOO_LARGE = _error("The body is over 16 MiB.")

OBJECT_BODY = {
    "required": False,
    "content": {
        "application/json": {"schema": {"type": "object", "additionalProperties": True}}
    },
}


def _invoke(operation_id: str, summary: str, parameters: list[Any]) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "tags": ["Web Endpoints"],
            "summary": summary,
            "parameters": parameters,
            "requestBody": OBJECT_BODY,
            "responses": {
                "200": {
                    "description": "The function's return value, serialized as JSON.",
                    "content": {"application/json": {"schema": {}}},
                },
                "400": BAD_JSON,
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "413": TOO_LARGE,
                "422": NOT_OBJECT,
                "429": _error("Too many calls wait for a container."),
                "500": _error(
                    "The function raised: its type, message and, where the"
                    " deployment allows it, its traceback."
                ),
                "503": _error("A container could not be started."),
                "504": _error("The call ran past the deployment's timeout."),
            },
        }
    }


def _path_parameter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


NAME = _path_parameter("name", {"type": "string"})
UUID = {"type": "string", "format": "uuid"}
SUBMIT_RESPONSE = "#/components/schemas/TaskSubmitResponse"
TIME = {"type": "string", "format": "date-time", "nullable": True}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.1",
        "info": {
            "title": "engine Beam-compatible API",
            "version": "1.0",
            "description": "Deployed endpoints, task queues and the Tasks API,"
            " served by `engine serve --http`.",
        },
        "security": [{"bearerAuth": []}],
        "paths": {
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Report that the daemon serves HTTP",
                    "responses": {
                        "200": {
                            "description": "Serving.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"status": {"type": "string"}},
                                        "required": ["status"],
                                    }
                                }
                            },
                        },
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document.",
                            "content": {
                                "application/json": {"schema": {"type": "object"}}
                            },
                        },
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/endpoint/{name}": _invoke(
                "invokeNamedEndpoint",
                "Invoke the latest version of a deployed endpoint",
                [NAME],
            ),
            "/endpoint/{name}/v{version}": _invoke(
                "invokeNamedEndpointVersion",
                "Invoke one version of a deployed endpoint",
                [NAME, _path_parameter("version", {"type": "integer"})],
            ),
            "/endpoint/id/{id}": _invoke(
                "invokeEndpointById",
                "Invoke a deployed endpoint by its deployment id",
                [_path_parameter("id", UUID)],
            ),
            "/taskqueue/{name}": {
                "post": {
                    "operationId": "submitTaskByName",
                    "tags": ["Task Queues"],
                    "summary": "Submit a task to a deployed task queue",
                    "parameters": [NAME],
                    "requestBody": OBJECT_BODY,
                    "responses": {
                        "200": {
                            "description": "Task stored and queued.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": SUBMIT_RESPONSE}
                                }
                            },
                        },
                        "400": BAD_JSON,
                        "401": UNAUTHORIZED,
                        "404": NOT_FOUND,
                        "413": TOO_LARGE,
                        "422": NOT_OBJECT,
                        "429": _error("The queue holds max_pending tasks."),
                    },
                }
            },
            "/v2/task/{task_id}/": {
                "get": {
                    "operationId": "getTaskStatus",
                    "tags": ["Tasks"],
                    "summary": "Get a task's status, result and outputs",
                    "parameters": [_path_parameter("task_id", UUID)],
                    "responses": {
                        "200": {
                            "description": "The task.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Task"}
                                }
                            },
                        },
                        "401": UNAUTHORIZED,
                        "404": NOT_FOUND,
                    },
                }
            },
            "/v2/task/{task_id}/outputs/{name}": {
                "get": {
                    "operationId": "downloadTaskOutput",
                    "tags": ["Tasks"],
                    "summary": "Download an output file of a task",
                    "parameters": [
                        _path_parameter("task_id", UUID),
                        _path_parameter("name", {"type": "string"}),
                    ],
                    "responses": {
                        "200": {
                            "description": "The file's bytes.",
                            "content": {
                                "application/octet-stream": {
                                    "schema": {"type": "string", "format": "binary"}
                                }
                            },
                        },
                        "401": UNAUTHORIZED,
                        "404": _error("Unknown task or file, or the outputs expired."),
                    },
                }
            },
            "/v2/task/cancel/": {
                "delete": {
                    "operationId": "cancelTasks",
                    "tags": ["Tasks"],
                    "summary": "Cancel tasks",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "task_ids": {"type": "array", "items": UUID}
                                    },
                                    "required": ["task_ids"],
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "What happened to each task id.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "$ref": "#/components/schemas/CancelResponse"
                                    }
                                }
                            },
                        },
                        "400": BAD_JSON,
                        "401": UNAUTHORIZED,
                        "413": TOO_LARGE,
                        "422": _error('The body is not {"task_ids": [...]}.'),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `engine token create`.",
                }
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "type": {"type": "string"},
                                "message": {"type": "string"},
                                "traceback": {"type": "string"},
                            },
                            "required": ["type", "message"],
                        }
                    },
                    "required": ["error"],
                },
                "TaskSubmitResponse": {
                    "type": "object",
                    "properties": {"task_id": UUID},
                    "required": ["task_id"],
                },
                "Task": {
                    "type": "object",
                    "properties": {
                        "id": UUID,
                        "status": {
                            "type": "string",
                            "enum": [
                                "PENDING",
                                "RUNNING",
                                "COMPLETE",
                                "ERROR",
                                "CANCELLED",
                                "TIMEOUT",
                            ],
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "size": {"type": "integer"},
                                    "url": {"type": "string"},
                                    "expires_in": {
                                        "type": "integer",
                                        "nullable": True,
                                    },
                                },
                            },
                        },
                        "started_at": TIME,
                        "ended_at": TIME,
                        "created_at": TIME,
                        "expires_in": {
                            "type": "integer",
                            "nullable": True,
                            "description": "Seconds until the outputs expire; null"
                            " until the task has completed.",
                        },
                        "attempts": {"type": "integer"},
                        "deployment_id": UUID,
                        "result": {"nullable": True},
                        "error": {
                            "type": "object",
                            "nullable": True,
                            "additionalProperties": True,
                        },
                    },
                    "required": ["id", "status", "outputs"],
                },
                "CancelResponse": {
                    "type": "object",
                    "properties": {
                        "cancelled": {"type": "array", "items": {"type": "string"}},
                        "finished": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "not_found": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["cancelled", "finished", "not_found"],
                },
            },
        },
    }
