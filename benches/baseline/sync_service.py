#!/usr/bin/env python3
"""Baseline for `cargo bench --bench push`: the Python synchronisation service that relais
replaces, as its design notes (seed 000, "Service de Synchronisation SQLite Local ->
Serveur Distant") describe it.

THIS IS A MEASURING STICK. It does what seed 000 does, no better and no worse:

- `sqlite3` and `requests`; one plain `requests.post(url, json=payload, timeout=...)` per
  row: no `Session`, so no connection reuse, and no `Idempotency-Key` (the seed sends none);
- the seed's anti-duplicate query, rescanning the whole history on every pass:
  `... WHERE id NOT IN (SELECT local_id FROM sync_tracking WHERE table_name = ?
  AND sync_status = 'success') ORDER BY date ASC`, fetched whole (the seed counts the rows
  to synchronise before sending them: "N evenement(s) a synchroniser");
- media rows loaded whole (`SELECT m.*`, the BLOB included), the BLOB base64-encoded whole
  into a second copy, the payload serialised by `requests` (`json=payload`);
- `INSERT OR REPLACE INTO sync_tracking` and `commit()` after every row, in the
  application's database (the seed keeps `sync_tracking` in surveillance.db), with
  Python's and SQLite's defaults (rollback journal, synchronous=FULL);
- success is HTTP 201, the remote id is the answer's `id`; failures are recorded
  `failed` with the message, and retried at every pass (the query excludes only
  `success` rows) and by the hourly retry;
- environment: LOCAL_DB_PATH, BACKEND_URL, DEVICE_ID, SYNC_MODE (once, periodic,
  continuous), SYNC_INTERVAL_MINUTES; console output as the seed shows it.

Choices where the seed is silent, all in the baseline's favour or neutral: `continuous`
(and `periodic`) sleep the whole interval with one `time.sleep` (no polling scheduler
waking every second); the capteur's name and state come from a LEFT JOIN in the same
query (no query per row); the media request timeout is 60 s (the seed shows 10 s for
events only).

Payloads are exactly those of the contract, section 2 (and of the seed's "API Backend
Requise").
"""

import base64
import os
import signal
import sqlite3
import sys
import time
from datetime import datetime

import requests

LOCAL_DB_PATH = os.environ.get("LOCAL_DB_PATH", "/data/surveillance.db")
BACKEND_URL = os.environ.get("BACKEND_URL", "http://backend:8000").rstrip("/")
SYNC_INTERVAL_MINUTES = float(os.environ.get("SYNC_INTERVAL_MINUTES", "5"))
DEVICE_ID = os.environ.get("DEVICE_ID", "raspberry-1")
SYNC_MODE = os.environ.get("SYNC_MODE", "continuous")

RETRY_INTERVAL_SECONDS = 3600


def connect():
    conn = sqlite3.connect(LOCAL_DB_PATH)
    conn.row_factory = sqlite3.Row
    return conn


def init_tracking_table():
    conn = connect()
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS sync_tracking (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            table_name TEXT NOT NULL,
            local_id INTEGER NOT NULL,
            remote_id INTEGER,
            sync_date TEXT NOT NULL,
            sync_status TEXT NOT NULL,
            error_message TEXT,
            UNIQUE(table_name, local_id)
        )
        """
    )
    conn.commit()
    conn.close()
    print("✅ Table de suivi des synchronisations initialisée")


def get_unsync_evenements(cursor):
    """Récupère UNIQUEMENT les événements NON synchronisés"""
    cursor.execute(
        """
        SELECT e.*, c.nom AS capteur_nom, c.etat AS capteur_etat
        FROM evenement e
        LEFT JOIN capteur c ON c.id_capteur = e.id_capteur
        WHERE e.id_evenement NOT IN (
            SELECT local_id
            FROM sync_tracking
            WHERE table_name = 'evenement'
            AND sync_status = 'success'
        )
        ORDER BY e.date ASC
        """
    )
    return cursor.fetchall()


def get_unsync_media(cursor):
    """Récupère UNIQUEMENT les médias NON synchronisés (BLOB compris)"""
    cursor.execute(
        """
        SELECT m.*, c.nom AS capteur_nom
        FROM media m
        LEFT JOIN capteur c ON c.id_capteur = m.id_capteur
        WHERE m.id_media NOT IN (
            SELECT local_id
            FROM sync_tracking
            WHERE table_name = 'media'
            AND sync_status = 'success'
        )
        ORDER BY m.date ASC
        """
    )
    return cursor.fetchall()


def mark_as_synced(conn, table_name, local_id, remote_id, success, error_message=None):
    cursor = conn.cursor()
    cursor.execute(
        """
        INSERT OR REPLACE INTO sync_tracking
        (table_name, local_id, remote_id, sync_date, sync_status, error_message)
        VALUES (?, ?, ?, ?, ?, ?)
        """,
        (
            table_name,
            local_id,
            remote_id,
            datetime.now().isoformat(),
            "success" if success else "failed",
            error_message,
        ),
    )
    conn.commit()


def sync_evenement(conn, evenement):
    payload = {
        "date": evenement["date"],
        "capteur": {
            "id": evenement["id_capteur"],
            "nom": evenement["capteur_nom"],
            "etat": evenement["capteur_etat"],
        },
        "device_id": DEVICE_ID,
        "source": "sync_service",
    }
    try:
        response = requests.post(f"{BACKEND_URL}/api/evenements", json=payload, timeout=10)
        if response.status_code == 201:
            remote_id = response.json().get("id")
            mark_as_synced(conn, "evenement", evenement["id_evenement"], remote_id, True)
            print(f"✅ Événement {evenement['id_evenement']} → Serveur (ID: {remote_id})")
            return True
        error = f"HTTP {response.status_code}: {response.text[:200]}"
    except requests.exceptions.ConnectionError:
        print("⚠️  Serveur inaccessible")
        error = "Serveur inaccessible"
    except Exception as e:  # noqa: BLE001 - the seed continues whatever happens
        error = str(e)
    mark_as_synced(conn, "evenement", evenement["id_evenement"], None, False, error)
    print(f"❌ Erreur sync événement {evenement['id_evenement']}: {error}")
    return False


def sync_media(conn, media):
    video = media["video"]
    video_data = base64.b64encode(video).decode("utf-8") if video is not None else None
    payload = {
        "date": media["date"],
        "capteur": {"id": media["id_capteur"], "nom": media["capteur_nom"]},
        "numero_camera": media["numero_camera"],
        "video_data": video_data,
        "device_id": DEVICE_ID,
        "source": "sync_service",
    }
    try:
        response = requests.post(f"{BACKEND_URL}/api/media", json=payload, timeout=60)
        if response.status_code == 201:
            remote_id = response.json().get("id")
            mark_as_synced(conn, "media", media["id_media"], remote_id, True)
            size_kb = len(video) / 1024 if video is not None else 0
            print(f"✅ Média {media['id_media']} → Serveur (ID: {remote_id}, {size_kb:.2f} KB)")
            return True
        error = f"HTTP {response.status_code}: {response.text[:200]}"
    except requests.exceptions.ConnectionError:
        print("⚠️  Serveur inaccessible")
        error = "Serveur inaccessible"
    except Exception as e:  # noqa: BLE001
        error = str(e)
    mark_as_synced(conn, "media", media["id_media"], None, False, error)
    print(f"❌ Erreur sync média {media['id_media']}: {error}")
    return False


def print_box(title, lines):
    width = 60
    print("╔" + "═" * width + "╗")
    print("║" + title.center(width) + "║")
    if lines:
        print("╠" + "═" * width + "╣")
        for line in lines:
            print("║" + line.ljust(width) + "║")
    print("╚" + "═" * width + "╝")


def synchronize():
    print(f"\n🔄 Début de synchronisation - {datetime.now():%Y-%m-%d %H:%M:%S}\n")
    stats = {"ev_ok": 0, "ev_ko": 0, "me_ok": 0, "me_ko": 0}
    conn = connect()
    try:
        cursor = conn.cursor()
        print("📋 Synchronisation des événements...")
        evenements = get_unsync_evenements(cursor)
        if evenements:
            print(f"   {len(evenements)} événement(s) à synchroniser")
            for e in evenements:
                stats["ev_ok" if sync_evenement(conn, e) else "ev_ko"] += 1
        else:
            print("   ✅ Tous les événements sont déjà synchronisés")

        print("\n🎥 Synchronisation des médias...")
        medias = get_unsync_media(cursor)
        if medias:
            print(f"   {len(medias)} média(s) à synchroniser")
            for m in medias:
                stats["me_ok" if sync_media(conn, m) else "me_ko"] += 1
        else:
            print("   ✅ Tous les médias sont déjà synchronisés")
        del medias
    finally:
        conn.close()
    print()
    print_box(
        "Rapport de Synchronisation",
        [
            f"  Événements synchronisés : {stats['ev_ok']:>3}",
            f"  Événements échoués      : {stats['ev_ko']:>3}",
            f"  Médias synchronisés     : {stats['me_ok']:>3}",
            f"  Médias échoués          : {stats['me_ko']:>3}",
        ],
    )
    return stats


def retry_failed():
    """Nouvelle tentative des échecs (toutes les heures)."""
    conn = connect()
    conn.execute("UPDATE sync_tracking SET sync_status = 'pending' WHERE sync_status = 'failed'")
    conn.commit()
    conn.close()


def print_statistics():
    conn = connect()
    rows = conn.execute(
        "SELECT table_name, sync_status, COUNT(*) AS n FROM sync_tracking "
        "GROUP BY table_name, sync_status ORDER BY table_name, sync_status"
    ).fetchall()
    conn.close()
    print("\n📊 Statistiques de synchronisation:")
    for r in rows:
        print(f"   {r['table_name']:<12} - {r['sync_status']:<8}: {r['n']:>4}")


def run_continuous():
    print(f"🔁 Mode: Synchronisation continue (toutes les {SYNC_INTERVAL_MINUTES:g} min)")
    last_retry = time.time()
    while True:
        synchronize()
        time.sleep(SYNC_INTERVAL_MINUTES * 60)
        if time.time() - last_retry >= RETRY_INTERVAL_SECONDS:
            retry_failed()
            last_retry = time.time()


def main():
    print_box(f"Service de Synchronisation - {DEVICE_ID}", [])
    print(f"\n💾 Base de données locale: {LOCAL_DB_PATH}")
    print(f"🌐 Serveur distant: {BACKEND_URL}")
    print(f"⏱️  Intervalle de sync: {SYNC_INTERVAL_MINUTES:g} minutes\n")
    init_tracking_table()

    if SYNC_MODE == "once":
        stats = synchronize()
        sys.exit(0 if stats["ev_ko"] == 0 and stats["me_ko"] == 0 else 1)

    def stop(signum, frame):
        print_statistics()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    run_continuous()


if __name__ == "__main__":
    main()
