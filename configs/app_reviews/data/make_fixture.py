"""Source of ``spotify_reviews_sample.csv`` — a synthetic fixture.

This script writes a small (~120 row) CSV in exactly the shape of Kaggle's
"3.4 Million Spotify Google Store Reviews" dataset, including the warts of the
real file (empty cells, emoji, many languages, quoted commas and doubled
quotes, multi-line reviews, duplicate texts, HTML entities).  All review text
is original and invented for this project; ids, names and timestamps are
generated deterministically from a fixed seed, so re-running the script
reproduces the fixture byte for byte.

Usage (from the repository root)::

    python3 configs/app_reviews/data/make_fixture.py

Standard library only.
"""

from __future__ import annotations

import csv
import datetime as _dt
import random
import uuid
from pathlib import Path

SEED = 3_400_000
OUT = Path(__file__).with_name("spotify_reviews_sample.csv")

HEADER = [
    "",
    "review_id",
    "pseudo_author_id",
    "author_name",
    "review_text",
    "review_rating",
    "review_likes",
    "author_app_version",
    "review_timestamp",
]

# (review_text, review_rating). A rating of None is written as an empty cell;
# an empty string text is written as an empty cell.
REVIEWS: list[tuple[str, int | None]] = [
    ("Great app", 5),
    ("Too many ads on the free version. I get an ad after every two songs, it's unbearable.", 2),
    ("Love it! Best music app out there 🎶🎧", 5),
    ("ok", 3),
    ("👍", 5),
    ("Shuffle is not random at all, it keeps playing the same 20 songs from a 900 song playlist.", 2),
    ("App crashes every time I open it after the latest update. Reinstalled, cleared cache, nothing works.", 1),
    ("Me encanta, tiene todas las canciones que busco y las listas son geniales.", 5),
    ("Muy buena app pero los anuncios son demasiados, cada 3 canciones un anuncio 😤", 3),
    ("Aplicativo ótimo, uso todo dia no trabalho. Só queria que o modo offline fosse mais estável.", 4),
    ("Aplikasinya bagus, tapi iklannya terlalu banyak. Tolong dikurangi.", 3),
    ("Sehr gute App, aber der Preis für Premium ist in letzter Zeit ziemlich gestiegen.", 3),
    ("Super appli, je l'utilise tous les jours pour mes podcasts.", 5),
    ("बहुत अच्छा ऐप है, सारे गाने मिल जाते हैं 👌", 5),
    ("音楽を聴くのに最高のアプリです。歌詞表示も便利。", 5),
    ("تطبيق رائع لكن الإعلانات كثيرة جدا", 3),
    ("Отличное приложение, но в последнее время часто вылетает.", 3),
    ("Great app", 5),
    ("Why do I need premium just to pick a song on mobile?? On the free tier I can only shuffle, which is ridiculous.", 1),
    ("", 4),
    ("Downloaded songs disappear when I'm offline, which is the whole point of downloading them. Please fix.", 1),
    ("Lyrics feature is back, thank you!!! ❤️", 5),
    ("The new UI is confusing, where is my library? Took me 10 minutes to find my liked songs.", 2),
    ('They call it "Smart Shuffle" but it just adds songs I\'ve never liked. Not smart.', 2),
    ("Podcasts keep resetting to the beginning, I lose my place every single time.", 2),
    ("Good", 4),
    ("Premium is worth it. No ads, offline listening, great sound quality.", 5),
    ("Price went up again, €10.99 now, for a family plan it's getting too expensive.", 3),
    ("Update:\nStill crashing on Android 14.\nPlease test your updates before releasing them.", 1),
    ("Best app for discovering new music. Discover Weekly is always on point 🔥", 5),
    ("I hate that the app keeps playing music by itself when my phone connects to bluetooth in the car", 2),
    ("nice", 4),
    ("Ads &amp; more ads. Every 15 minutes a 30 second ad. Can't even skip.", 1),
    ("Can&#39;t log in with Facebook anymore, it just spins forever.", 1),
    ("Excelente aplicación, la uso para correr y las playlists de entrenamiento son lo mejor 🏃‍♂️", 5),
    ("Não consigo mais ver a letra das músicas sem pagar o premium. Decepcionante.", 2),
    ("Aplikasi musik terbaik! Podcast juga banyak pilihannya 😍", 5),
    ("Seit dem letzten Update stürzt die App ständig ab. Bitte beheben!", 1),
    ("Trop de pubs, et on ne peut pas choisir l'ordre des chansons sans abonnement.", 2),
    ("Great app", 5),
    ("The sleep timer is a lifesaver. I fall asleep to podcasts every night.", 5),
    ('My 5 star review: "it just works". Music, podcasts, audiobooks, all in one place.', 5),
    ("Widget doesn't update, shows the wrong song most of the time.", 3),
    ("Good app but the battery drain is real, it uses 20% of my battery in an hour, even with the screen off.", 3),
    ("", None),
    ("Volume suddenly drops in the middle of songs. Annoying.", 2),
    ("The AI DJ is actually fun! Didn't expect to like it this much.", 5),
    ("please bring back the old heart button 😭", 3),
    ("Love it", 5),
    ('Why does "Liked Songs" shuffle only play songs I added in 2019?', 2),
    ("Audio quality on 'Very high' is great with my headphones. Crossfade setting is a nice touch.", 5),
    ("Connect to my speaker works perfectly, switching devices is seamless.", 5),
    (
        "I have been a premium subscriber for six years and I am honestly done. Every update makes the app worse. "
        "They moved the library around again, the shuffle button now turns into smart shuffle which I never asked for, "
        "the home screen is full of podcasts and audiobooks I will never listen to, and half the time the downloaded "
        "songs won't play offline on the subway because the app suddenly decides it needs to verify my account. "
        "Lyrics were paywalled for a while, then came back, then broke again. The car view was removed. "
        "Canvas videos eat my data. And yet the price keeps going up every year. I don't want a social network or a "
        "video app, I want a music player that plays my music reliably. Customer support just tells me to reinstall. "
        "I did, three times. Cancelling my subscription this month and moving to something else. Very disappointed.",
        1,
    ),
    ("Very good", 5),
    ("Keeps logging me out randomly", 2),
    ("Baguus", 5),
    ("Muito bom!!! 🎵🎵🎵", 5),
    ("Me gusta mucho pero se traba cuando cambio de canción rápido, a veces se queda la pantalla negra.", 3),
    ("Premium family plan, 6 accounts, totally worth it for us.", 5),
    ("The queue randomly clears itself, so I lose everything I lined up. Happens at least once a day.", 2),
    ("Podcast episodes mark as played when I've only listened to 5 minutes. Fix this please.", 3),
    ("Great music selection, but the app is slow on my older phone (Galaxy A10).", 3),
    ("app sucks now", 1),
    ("I can't download more than 10,000 songs, which is a weird limit for a paid service.", 3),
    ("Offline mode works perfectly on flights ✈️, downloaded 3 albums and no issues at all.", 5),
    ("5 stars", 5),
    ("Worst update ever. Give me back the old version!!!", 1),
    ("bagus banget, lagu lagu nya lengkap", 5),
    ("It says \"No internet connection\" even though I'm on wifi and every other app works.", 1),
    ("Good", 4),
    ("Playlists made for me are honestly better than the ones my friends make lol", 5),
    ("Ad volume is twice as loud as the music. Hurts my ears with headphones on.", 1),
    ("Gran app para escuchar podcasts en español, la recomiendo.", 5),
    ("Muito anúncio, a cada duas músicas tem propaganda. Assim não dá.", 1),
    ("Die Playlists sind super, &quot;Release Radar&quot; ist mein Favorit.", 5),
    ("Je n'arrive plus à télécharger mes playlists hors ligne depuis la mise à jour.", 2),
    ("ऐड बहुत ज्यादा आते हैं, प्रीमियम बहुत महंगा है", 2),
    ("オフラインで再生できない曲がある。改善してほしい。", 3),
    ("أفضل تطبيق للموسيقى، أستخدمه كل يوم 👍", 5),
    ("Лучший музыкальный сервис, пользуюсь каждый день.", 5),
    ("Can't scroll through lyrics while the song plays, it always snaps back.", 3),
    ("Everything is fine, music is good, app is good.", 4),
    ("Great app, no complaints", 5),
    ("The app is okay, but why is there a video feed on the home page now? It's a music app, not TikTok.", 2),
    ("Student discount is a great deal. Thank you!", 5),
    ("Songs skip on their own after 10 seconds, then it says I'm out of skips. I didn't skip anything!", 1),
    ("Love it", 5),
    ("Keeps asking me to rate the app. Here you go. 1 star.", 1),
    ("Wrapped this year was amazing 😂 showed me I listened to one song 400 times", 5),
    ("pls fix shuffle", 2),
    ("Great for audiobooks too, 15 hours a month included with premium is nice.", 4),
    ("Ever since the update, the lock screen controls don't show up. I have to unlock my phone to skip a song.", 2),
    ("Bluetooth audio stutters, \"Hi-Fi\" my foot, the sound keeps cutting out.", 1),
    ("excellent 👌👌", 5),
    ("Good app, bad ads", 3),
    ("🔥🔥🔥", 5),
    ("I like that I can follow artists and get notified when they release music.", 4),
    ("Random songs from other genres appear in my playlist when it ends. Turn off autoplay?\nFound it in settings, nevermind. 4 stars.", 4),
    ("Podcast video doesn't work on mobile data, only on wifi.", 3),
    ("The search is terrible, I type the exact name of a song and it shows me a podcast.", 2),
    ("La aplicación no carga, se queda en la pantalla verde.", 1),
    ("Adoro, ouço música o dia todo ❤️", 5),
    ("Tidak bisa putar lagu offline padahal sudah didownload. Kecewa.", 1),
    ("Gute Auswahl an Podcasts &amp; Hörbüchern.", 4),
    ("Parfait pour découvrir de nouveaux artistes 🎶", 5),
    ("Sometimes the app randomly pauses when I lock my phone, very frustrating during workouts.", 2),
    ("Simple, clean, works. What more do you need?", 5),
    ("not bad", 3),
    ("", 1),
    ("I'm paying for premium and still get podcast ads. Ridiculous.", 1),
    ("Jam sessions with friends are a cool feature, we use it at parties.", 5),
    ("The app uses way too much storage, 3GB of cache.", 2),
    ("Fantastic!", None),
    ("Can I please just have a way to hide songs from a playlist without deleting them? That would be perfect.", 4),
    ("I've been using it since 2015, still the best.", 5),
    ('Line 1, line 2, "line 3"\n\nSeriously though, why can\'t I sort my playlist by date added on the phone?', 3),
    ("Best app ever", 5),
    ("I tap 'Add to queue' and it plays the song immediately instead 🙄", 2),
    ("Me encanta 💚", 5),
    ("Setelah update, lirik tidak muncul lagi.", 2),
]

FIRST = [
    "Maria", "James", "Aisha", "Lucas", "Priya", "Kenji", "Fatima", "Daniel", "Sofia", "Ahmed",
    "Olga", "Rizky", "Emma", "João", "Hannah", "Carlos", "Chloé", "Rahul", "Yuki", "Dmitri",
    "Grace", "Omar", "Ana", "Putri", "Lena", "Michael", "Sarah", "Tyler", "Nadia", "Kevin",
]
LAST = [
    "Smith", "Garcia", "Silva", "Kumar", "Tanaka", "Müller", "Dubois", "Hassan", "Ivanova", "Santoso",
    "Johnson", "Rodríguez", "Oliveira", "Sharma", "Nakamura", "Schmidt", "Martin", "Ali", "Petrov", "Wijaya",
]
VERSIONS = [
    "8.8.12.545", "8.8.14.575", "8.8.20.544", "8.8.36.522", "8.8.50.466", "8.8.60.526",
    "8.8.70.520", "8.8.84.283", "8.8.96.364", "8.7.78.373", "8.9.2.634", "8.9.10.615",
]


def _name(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.2:
        return "A Google user"
    first, last = rng.choice(FIRST), rng.choice(LAST)
    if roll < 0.3:
        return first  # first name only
    if roll < 0.35:
        return f"{first.lower()}{rng.randint(1, 999)}"  # handle-like
    return f"{first} {last}"


def _likes(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.65:
        return 0
    if roll < 0.92:
        return rng.randint(1, 15)
    return rng.randint(16, 2400)


def build_rows(seed: int = SEED) -> list[list[str]]:
    rng = random.Random(seed)
    start = _dt.datetime(2022, 1, 1)
    span = int((_dt.datetime(2024, 6, 30) - start).total_seconds())
    rows = []
    for idx, (text, rating) in enumerate(REVIEWS):
        review_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        author_id = str(rng.randint(10**20, 10**21 - 1))
        name = _name(rng)
        likes = _likes(rng)
        version = "" if rng.random() < 0.3 else rng.choice(VERSIONS)
        ts = start + _dt.timedelta(seconds=rng.randrange(span))
        rows.append([
            str(idx),
            review_id,
            author_id,
            name,
            text,
            "" if rating is None else str(rating),
            str(likes),
            version,
            ts.strftime("%Y-%m-%d %H:%M:%S"),
        ])
    return rows


def main() -> None:
    rows = build_rows()
    with OUT.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
